"""Memory planning sees the memory the process may really use (a cgroup v2 limit caps the host's MemAvailable;
the GPU is the one CUDA_VISIBLE_DEVICES shows), and a remembered downgrade is retried from the requested plan when
the device, its memory, the model file or the memory available changed, instead of being kept forever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.config import EngineConfig
from serve_app.engine.device import device_name, gpu_memory, visible_device
from serve_app.engine.plan import (
    ContextPlan,
    Measured,
    cgroup_free_bytes,
    host_free_bytes,
    memory_budget,
    memory_ladder,
    model_key,
    read_profile,
    write_profile,
)

GiB = 2**30


def fake_cgroup(tmp_path: Path, limit: str, current: str) -> Path:
    d = tmp_path / "cgroup"
    d.mkdir()
    (d / "memory.max").write_text(limit + "\n")
    (d / "memory.current").write_text(current + "\n")
    return d


def meminfo(tmp_path: Path, kib: int) -> Path:
    p = tmp_path / "meminfo"
    p.write_text(f"MemTotal:       99999999 kB\nMemFree:        1 kB\nMemAvailable:   {kib} kB\n")
    return p


def test_cgroup_limit_caps_host_free_memory(tmp_path: Path) -> None:
    cg = fake_cgroup(tmp_path, str(4 * GiB), str(3 * GiB))
    host = meminfo(tmp_path, 64 * 2**20)  # the host says 64 GiB are available
    assert cgroup_free_bytes(cg) == GiB
    assert host_free_bytes(host, cg) == GiB


def test_no_cgroup_limit_means_the_host_figure(tmp_path: Path) -> None:
    cg = fake_cgroup(tmp_path, "max", str(3 * GiB))
    host = meminfo(tmp_path, 2 * 2**20)
    assert cgroup_free_bytes(cg) is None
    assert host_free_bytes(host, cg) == 2 * GiB
    assert host_free_bytes(host, tmp_path / "no-cgroup-here") == 2 * GiB
    assert host_free_bytes(tmp_path / "no-meminfo", cg) is None


def test_a_cgroup_over_its_limit_has_nothing_free(tmp_path: Path) -> None:
    cg = fake_cgroup(tmp_path, str(GiB), str(2 * GiB))
    assert host_free_bytes(meminfo(tmp_path, 2**20), cg) == 0


def test_memory_budget_takes_the_smaller_of_config_and_free() -> None:
    assert memory_budget(EngineConfig(memory_budget_mb=100), 10 * GiB) == 100 * 2**20
    assert memory_budget(EngineConfig(), 10 * GiB) == 9 * GiB
    assert memory_budget(EngineConfig(), None) is None
    assert memory_budget(EngineConfig(memory_budget_mb=100), None) == 100 * 2**20


@pytest.mark.parametrize(("value", "expected"), [
    (None, 0), ("0", 0), ("2,3", 2), (" 1 ", 1), ("", None), ("-1", None), ("NoDevFiles", None),
    ("GPU-8f3c2a1e-0000-1111-2222-333344445555,1", "GPU-8f3c2a1e-0000-1111-2222-333344445555"),
    ("MIG-1234abcd", "MIG-1234abcd"),
])
def test_cuda_visible_devices_picks_the_gpu(value: str | None, expected: int | str | None) -> None:
    assert visible_device(value) == expected


def test_gpu_queries_never_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a driver (or with no visible device) the answers are None / 'cpu', not exceptions."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_memory() is None
    assert device_name() == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-not-a-real-uuid")
    assert gpu_memory() is None or set(gpu_memory() or {}) == {"used_bytes", "free_bytes", "total_bytes"}
    assert isinstance(device_name(), str)


REQUESTED = ContextPlan(8, 4096, 512, 512, "f16", -1, "auto")
DOWNGRADED = ContextPlan(2, 2048, 512, 512, "f16", -1, "auto")
SEEN = Measured(device="NVIDIA_L4", total_bytes=24 * GiB, budget_bytes=8 * GiB, model_key="123-abc")


def saved(tmp_path: Path) -> str:
    path = str(tmp_path / ".engine-profiles" / "m.json")
    write_profile(path, REQUESTED, DOWNGRADED, SEEN)
    return path


def test_a_profile_is_used_on_the_hardware_and_model_it_was_measured_on(tmp_path: Path) -> None:
    path = saved(tmp_path)
    assert json.loads(Path(path).read_text())["measured"]["device"] == "NVIDIA_L4"
    assert read_profile(path, REQUESTED, SEEN) == DOWNGRADED
    # A little more memory than then is noise, not a reason to fail down the ladder again.
    assert read_profile(path, REQUESTED, Measured("NVIDIA_L4", 24 * GiB, 9 * GiB, "123-abc")) == DOWNGRADED


@pytest.mark.parametrize("now", [
    Measured("NVIDIA_H100_80GB_HBM3", 80 * GiB, 8 * GiB, "123-abc"),  # another GPU
    Measured("NVIDIA_L4", 48 * GiB, 8 * GiB, "123-abc"),  # same name, more memory
    Measured("NVIDIA_L4", 24 * GiB, 8 * GiB, "456-def"),  # another model file
    Measured("NVIDIA_L4", 24 * GiB, 20 * GiB, "123-abc"),  # much more memory free now
    Measured("NVIDIA_L4", 24 * GiB, None, "123-abc"),  # no limit known now
])
def test_a_downgrade_is_retried_upward_when_what_it_was_measured_on_changed(tmp_path: Path, now: Measured) -> None:
    assert read_profile(saved(tmp_path), REQUESTED, now) is None


def test_a_profile_for_other_settings_or_an_old_format_is_ignored(tmp_path: Path) -> None:
    path = saved(tmp_path)
    assert read_profile(path, ContextPlan(4, 4096, 512, 512, "f16", -1, "auto"), SEEN) is None
    old = tmp_path / "old.json"  # written before profiles recorded what they were measured on
    old.write_text(json.dumps({"requested": REQUESTED.describe(), "plan": DOWNGRADED.describe()}))
    assert read_profile(str(old), REQUESTED, SEEN) is None
    (tmp_path / "junk.json").write_text("{not json")
    assert read_profile(str(tmp_path / "junk.json"), REQUESTED, SEEN) is None


def test_model_key_tells_files_apart(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(b"GGUF" + bytes(300_000))
    b.write_bytes(b"GGUF" + bytes(299_999) + b"\x01")
    c.write_bytes(b"GGUF" + bytes(300_000))
    assert model_key(str(a)) != model_key(str(b))
    assert model_key(str(a)) == model_key(str(c))


def test_memory_ladder_only_gets_cheaper() -> None:
    plans = memory_ladder(REQUESTED, n_layers=8, on_gpu=True)
    assert plans[0] == REQUESTED and plans[-1].n_gpu_layers == 0
    assert plans[-1].n_parallel == 1 and plans[-1].n_ctx_per_slot == 256 and plans[-1].kv_type == "q4_0"
    assert len(plans) == len(set(plans))
