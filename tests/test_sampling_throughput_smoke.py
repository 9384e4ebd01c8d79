"""benchmarks/sampling_throughput.py: runs end to end (fp32 and bf16 UNets, tiny preset) and rejects bad input."""
import pytest
import torch

from tests._scripts import load_script
from tests._versions import DDPM_PT_OUTPUT

bench = load_script("benchmarks/sampling_throughput.py", "psld_bench_sampling_throughput")


NEEDS_DDPM_PT = pytest.mark.skipif(not DDPM_PT_OUTPUT, reason="the bfloat16 DDPMPipeline baseline needs diffusers >= 0.41 "
                                   "(before, its output is always NumPy, which has no bfloat16)")


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=NEEDS_DDPM_PT)])
def test_writes_a_table_with_device_and_dtype(tmp_path, dtype):
    out = tmp_path / "tp.md"
    rows = bench.main(["--configs", "tiny:2:3", "--repeats", "1", "--threads", "1", "--dtype", dtype,
                       "--out", str(out)])
    (row,) = rows
    assert row["device"] == "cpu" and row["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert row["nfe"] == 3 and row["batch"] == 2
    assert len(row["psld_times"]) == 1 and len(row["ddpm_times"]) == 1
    assert row["psld_img_s"] > 0 and row["ddpm_img_s"] > 0
    assert row["ratio"] == pytest.approx(row["psld_img_s"] / row["ddpm_img_s"])
    text = out.read_text()
    assert f"UNet dtype {dtype}" in text and f"| tiny | cpu | {row['dtype']} |" in text
    assert f"--dtype {dtype}" in text  # the rerun command is recorded


@NEEDS_DDPM_PT
def test_the_unets_really_run_in_the_requested_dtype(monkeypatch):
    seen = []
    real = bench._run

    def spy(pipe, *a, **k):
        seen.append(pipe.unet.dtype)
        return real(pipe, *a, **k)

    monkeypatch.setattr(bench, "_run", spy)
    bench.bench("tiny", 1, 2, 1, dtype=torch.bfloat16)
    assert seen and all(d == torch.bfloat16 for d in seen)


@pytest.mark.parametrize("argv, msg", [
    (["--repeats", "0"], "--repeats"),
    (["--dtype", "fp8"], "--dtype"),
    (["--device", "nonsense"], "--device"),
])
def test_bad_arguments_are_named(argv, msg, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_request_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_bad_config_entry_is_named():
    with pytest.raises(ValueError, match="preset:batch:nfe"):
        bench.parse_configs("tiny:2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_bf16_smoke(tmp_path):
    (row,) = bench.main(["--device", "cuda", "--dtype", "bf16", "--configs", "tiny:4:3", "--repeats", "1"])
    assert row["device"].startswith("cuda") and row["psld_img_s"] > 0
