"""The deviceless GPU check's parsing and expectations (tools/gpu_check.py); the compile
itself runs in `make gpu-check` (its own venv with the CUDA plugin)."""

from tools import gpu_check as gc

PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'scaled_matmul_int8' for 'sm_90a'
ptxas info    : Function properties for scaled_matmul_int8
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers
ptxas info    : Compile time = 87.544 ms
ptxas info    : Function properties for mosaic_kernel
    136 bytes stack frame, 196 bytes spill stores, 132 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 1 bytes smem, 136 bytes cumulative stack size
"""

SASS = """\
        Function : scaled_matmul_int8
        /*0a70*/                   IGMMA.64x128x32.S8.S8 R24, gdesc[UR4], RZ, !UPT ;   /* 0x... */
        /*0b70*/                   IGMMA.64x128x32.S8.S8 R24, gdesc[UR8], R24 ;
        /*0c70*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0d70*/                   IMMA.16832.S8.S8.SAT R4, R8, R12, R4 ;
        /*0e70*/                   MOV R1, c[0x0][0x28] ;
"""

THUNKS = ("001: kCustomKernel [source | sink] scaled_matmul_int8 grid: [512, 1, 1] threads: [256, 1, 1]"
          "  shared_memory: 98304 bytes\n002: kCustomCall [source | sink] kCustomCall\n")


def test_parse_ptxas():
  out = gc.parse_ptxas(PTXAS)
  assert out["scaled_matmul_int8"] == dict(registers=128, stack=0, spill_stores=0, spill_loads=0, smem=0)
  assert out["mosaic_kernel"] == dict(registers=255, stack=136, spill_stores=196, spill_loads=132, smem=1)


def test_parse_sass_and_smem():
  mma = gc.parse_sass_mma(SASS)
  assert mma == {"IGMMA.64x128x32.S8.S8": 2, "HMMA.16816.F32": 1, "IMMA.16832.S8.S8.SAT": 1}
  assert gc.parse_thunk_smem(THUNKS) == {"scaled_matmul_int8": 98304}
  assert gc.parse_mosaic_smem("x dynamic_shared_memory_size %c200728_i32 args(%1)\n"
                              "dynamic_shared_memory_size %c1024_i32") == 200728
  assert gc.entry_functions(".visible .entry scaled_matmul_int8(\n .param") == ["scaled_matmul_int8"]


def _ok(**kw):
  return dict(registers=128, spill_stores=0, spill_loads=0, smem=98304, **kw)


def test_expectations_per_target_and_shape():
  hopper_int8 = gc.Config("mosaic", "int8", "prefill", "sm_90a")
  assert gc.check_result(hopper_int8, _ok(mma={"IGMMA.64x128x32.S8.S8": 8}), 232448) == []
  fails = gc.check_result(hopper_int8, _ok(mma={"IMMA.16832.S8.S8.SAT": 8}), 232448)
  assert fails and "IGMMA" in fails[0]
  fp8 = gc.Config("triton", "fp8", "prefill", "sm_90a")
  fails = gc.check_result(fp8, _ok(mma={"HMMA.16816.F32": 32}), 232448)
  assert any("QGMMA" in f for f in fails) and any("converted" in f for f in fails)
  decode = gc.Config("triton", "int8", "decode", "sm_90a")  # mma.sync: wgmma needs M >= 64
  assert gc.check_result(decode, _ok(mma={"IMMA.16832.S8.S8.SAT": 16}), 232448) == []
  ampere = gc.Config("triton", "int8", "prefill", "sm_80")
  assert gc.check_result(ampere, _ok(mma={"IMMA.16832.S8.S8.SAT": 64}), 166912) == []
  spilled = gc.check_result(ampere, dict(_ok(mma={"IMMA.16832.S8.S8.SAT": 1}), spill_stores=8), 166912)
  assert spilled and "spill" in spilled[0]
  assert "shared memory" in gc.check_result(ampere, dict(_ok(mma={"IMMA.16832.S8.S8.SAT": 1}), smem=200000),
                                            166912)[0]


def test_every_pickable_kernel_is_in_the_sweep():
  configs = gc.all_configs()
  assert len(set(configs)) == len(configs)
  for target in gc.TARGETS:
    for shape in gc.SHAPES:
      assert gc.Config("triton", "int8", shape, target) in configs
  for qtype in gc.QTYPES:
    for shape in gc.SHAPES:
      assert gc.Config("mosaic", qtype, shape, "sm_90a") in configs
  assert not any(c.qtype == "fp8" and c.target == "sm_80" for c in configs)  # refused instead
  rows = gc.registry_rows()
  assert ("sm_90a", "int8", "prefill", "mosaic") in rows
  assert ("sm_90a", "int8", "decode", "triton") in rows
  assert ("sm_90a", "fp8", "decode", "mosaic") in rows
  assert any(r[:2] == ("sm_80", "fp8") and r[3].startswith("refused: float8_e4m3fn needs") for r in rows)
