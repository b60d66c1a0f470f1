"""A worker's devices from ``--devices`` / FTUNE_WORKER_DEVICES: CPU ranks, GPU counts and
lists (checked against the GPUs the process sees), and the CUDA_VISIBLE_DEVICES that gives a
worker only its GPUs."""

from __future__ import annotations

import os
import subprocess

import pytest

from ftune.models.settings import EngineSettings, SettingsError
from ftune.processes import ftune_command
from ftune.service import settings as service_settings
from ftune.workers.heartbeat import beat_payload
from ftune.workers.main import use_devices
from ftune.workers.placement import ONE_DEVICE, WorkerDevices, parse_devices


@pytest.mark.parametrize(("text", "ids"), [
    (None, (0,)), ("1", (0,)), ("4", (0, 1, 2, 3)), (" 2 ", (0, 1)),
    ("all", (0,)),  # CPU ranks share the same cores: one uses them as well
    ("0,1", (0, 1)), ("3, 5", (0, 1)),  # a list: that many ranks
])
def test_cpu_ranks(text, ids):
    for device, gpus in (("cpu", 8), (None, 0)):  # asked for, or no GPU to be had
        devices = parse_devices(text, device=device, gpus=gpus)
        assert devices == WorkerDevices("cpu", ids)
        assert devices.environment() == {}


@pytest.mark.parametrize(("text", "message"), [
    ("0", "a count from 1 to 64"), ("65", "a count from 1 to 64"),
    ("-1", "'-1' is not a device number"), ("0,-1", "'-1' is not a device number"),
    ("two", "'two' is not a device number"), ("1,,2", "'' is not a device number"),
    ("0,1,0", "0 listed twice"), ("", "'' is not a device number"),
])
def test_junk_is_refused_saying_what_is_wrong(text, message):
    for device, gpus in (("cpu", 0), ("cuda", 4)):
        with pytest.raises(ValueError, match=message):
            parse_devices(text, device=device, gpus=gpus)


def test_gpus_are_counted_against_what_the_process_sees():
    assert parse_devices("all", device=None, gpus=4) == WorkerDevices("cuda", (0, 1, 2, 3))
    assert parse_devices("2", device="cuda", gpus=4) == WorkerDevices("cuda", (0, 1))
    assert parse_devices("2,3", device=None, gpus=4) == WorkerDevices("cuda", (2, 3))
    with pytest.raises(ValueError, match="3 GPUs asked, 2 visible"):
        parse_devices("3", device=None, gpus=2)
    with pytest.raises(ValueError, match="no GPU 4; this process sees 4"):
        parse_devices("1,4", device="cuda", gpus=4)
    with pytest.raises(ValueError, match="no GPU is visible"):
        parse_devices("all", device="cuda", gpus=0)
    with pytest.raises(ValueError, match="names one GPU"):
        parse_devices("2", device="cuda:1", gpus=4)
    # Unset: the one device the engine's setting names, as before.
    assert parse_devices(None, device="cuda:1", gpus=4) == WorkerDevices("cuda", (1,))
    assert parse_devices(None, device=None, gpus=4).count == 1


def test_a_worker_sees_only_its_gpus():
    assert WorkerDevices("cuda", (2, 3)).environment() == {"CUDA_VISIBLE_DEVICES": "2,3"}
    # Already narrowed by whoever started the worker: the list indexes into that.
    assert (WorkerDevices("cuda", (0, 1)).environment("4,5,6,7")
            == {"CUDA_VISIBLE_DEVICES": "4,5"})
    assert ONE_DEVICE.environment() == {}


def test_the_setting_is_checked_and_the_option_wins(tmp_path):
    with pytest.raises(SettingsError, match="FTUNE_WORKER_DEVICES"):
        service_settings.load(home=tmp_path, worker_devices="0;1")
    settings = service_settings.load(home=tmp_path, worker_devices="3",
                                     engine=EngineSettings(device="cpu"))
    assert use_devices(settings).count == 3
    assert use_devices(settings, "2").count == 2
    with pytest.raises(ValueError, match=r"^--devices: devices '0,0': 0 listed twice"):
        use_devices(settings, "0,0")


def test_the_heartbeat_advertises_the_devices():
    beat = beat_payload(WorkerDevices("cuda", (2, 3)))
    assert beat["devices"] == 2 and beat["device_kind"] == "cuda"
    assert beat_payload()["devices"] == 1


@pytest.mark.processes
def test_ftune_worker_refuses_bad_devices_before_it_starts(tmp_path):
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "FTUNE_HOME": str(tmp_path)}
    done = subprocess.run(ftune_command("worker", "--device", "cpu", "--devices", "0,0"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: --devices: devices '0,0': 0 listed twice" in done.stderr
