"""Reference embeddings from the model's own implementation (PyTorch `transformers`, CPU),
for tests/test_models_bert.py to check the Flax port against without torch installed.
Run once where torch and transformers are installed; the output is committed.

  HF_HUB_OFFLINE=1 python examples/minilm/make_reference.py
"""

from pathlib import Path

import numpy as np

from actquant_jax.models.bert import minilm_dir

HERE = Path(__file__).resolve().parent
OUT = HERE.parent.parent / "tests" / "data" / "minilm_reference.npz"


def reference_embeddings(sentences, max_len=128):
  import torch
  from transformers import AutoModel, AutoTokenizer
  d = str(minilm_dir())
  tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
  enc = tok(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
  with torch.no_grad():
    h = model(**enc).last_hidden_state
  m = enc["attention_mask"].unsqueeze(-1).float()
  return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1).numpy()


def main():
  sentences = (HERE / "data" / "evaluation.txt").read_text().splitlines()[:24]
  sentences.append("A deliberately long sentence " + "that repeats itself " * 80 + "to test truncation.")
  OUT.parent.mkdir(exist_ok=True)
  np.savez(OUT, sentences=np.array("\n".join(sentences)), embeddings=reference_embeddings(sentences))
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
