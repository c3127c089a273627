"""On a machine with an NVIDIA GPU: every whisper_gpu_* reading of a running exporter against nvidia-smi.

    python benchmarks/gpu_vs_nvidia_smi.py [--seconds 60] [--port 10119] [--out compare.json]

A Whisper-large-v3-shaped model (transformers' WhisperForConditionalGeneration with large-v3's
dimensions, random weights in fp16: nothing downloaded) runs encoder + decoder passes on the GPU
in a child process, so the readings move. The exporter runs beside it (`whisper-exporter run`, GPU
collector every 250 ms, the load's pid as the watched server). Each round scrapes /metrics and
runs `nvidia-smi --query-gpu` and `--query-compute-apps` straight after, and the script prints one
table row per reading: exporter, nvidia-smi, difference. Exits 1 when a reading that should agree
(memory, totals, limits, clocks within their units) does not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import requests
from prometheus_client.parser import text_string_to_metric_families

LOAD = r"""
import os, sys, time, torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
# large-v3's dimensions (its config.json), random weights: no hub download
config = WhisperConfig(vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
                       encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                       decoder_ffn_dim=5120, max_source_positions=1500, max_target_positions=448)
torch.set_default_dtype(torch.float16)
with torch.device("cuda"):  # built on the GPU directly: no slow CPU init of 1.5 B parameters
    model = WhisperForConditionalGeneration(config).eval()
features = torch.randn(8, 128, 3000, dtype=torch.float16, device="cuda")  # a batch of 8 x 30 s of audio
tokens = torch.randint(0, 51866, (8, 128), device="cuda")
print("ready", flush=True)
deadline = time.time() + float(sys.argv[1])
with torch.inference_mode():
    while time.time() < deadline:
        model(input_features=features, decoder_input_ids=tokens)
        torch.cuda.synchronize()
"""

SMI_FIELDS = [
    "index", "uuid", "name", "utilization.gpu", "utilization.memory", "memory.used", "memory.total",
    "memory.reserved", "temperature.gpu", "power.draw", "power.limit", "clocks.sm",
    "ecc.errors.corrected.volatile.total", "ecc.errors.uncorrected.volatile.total",
]
MIB = 1024 * 1024


def smi_gpu() -> dict[str, str]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()[0]
    return dict(zip(SMI_FIELDS, (v.strip() for v in out.split(","))))


def smi_apps() -> dict[int, float]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    apps = {}
    for line in out.splitlines():
        pid, used = (v.strip() for v in line.split(","))
        if pid.isdigit() and used.replace(".", "").isdigit():
            apps[int(pid)] = float(used) * MIB
    return apps


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def pick(values: dict, name: str, **labels: str) -> Optional[float]:
    for (n, ls), v in values.items():
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items()):
            return v
    return None


def number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None  # [N/A], [Not Supported]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--port", type=int, default=10119)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not shutil.which("nvidia-smi"):
        print("nvidia-smi not found: this needs a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-compare-"))
    load = subprocess.Popen([sys.executable, "-c", LOAD, str(args.seconds + 60)], stdout=subprocess.PIPE, text=True)
    assert load.stdout is not None
    if load.stdout.readline().strip() != "ready":
        print("the GPU load did not start", file=sys.stderr)
        return 2
    (work / "exporter.yml").write_text(
        f"listen: 127.0.0.1:{args.port}\n"
        "collectors:\n"
        "  gpu: {enabled: true, interval: 250ms}\n"
        f"  process: {{enabled: true, interval: 250ms, match: null, pid: {load.pid}}}\n"
        "  probe: {enabled: false}\n")
    exporter = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config", str(work / "exporter.yml")],
                                stderr=open(work / "exporter.log", "w"))
    url = f"http://127.0.0.1:{args.port}/metrics"
    rows: dict[str, list[tuple[float, float]]] = {}
    failures: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if pick(scrape(url), "whisper_gpu_process_memory_used_bytes") is not None:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                print(open(work / "exporter.log").read(), file=sys.stderr)
                return 2
            time.sleep(0.5)
        time.sleep(5)  # let the load reach its steady state
        for _ in range(args.rounds):
            ours = scrape(url)  # the last run at most 250 ms ago ...
            gpu = smi_gpu()  # ... and nvidia-smi straight after
            apps = smi_apps()
            index = gpu["index"]
            pairs = {
                "utilization (ratio)": (pick(ours, "whisper_gpu_utilization_ratio", gpu=index),
                                        (number(gpu["utilization.gpu"]) or 0) / 100),
                "memory utilization (ratio)": (pick(ours, "whisper_gpu_memory_utilization_ratio", gpu=index),
                                               (number(gpu["utilization.memory"]) or 0) / 100),
                "memory used (MiB)": (_div(pick(ours, "whisper_gpu_memory_used_bytes", gpu=index), MIB),
                                      number(gpu["memory.used"])),
                "memory total (MiB)": (_div(pick(ours, "whisper_gpu_memory_total_bytes", gpu=index), MIB),
                                       number(gpu["memory.total"])),
                "memory reserved (MiB)": (_div(pick(ours, "whisper_gpu_memory_reserved_bytes", gpu=index), MIB),
                                          number(gpu["memory.reserved"])),
                "temperature (C)": (pick(ours, "whisper_gpu_temperature_celsius", gpu=index),
                                    number(gpu["temperature.gpu"])),
                "power (W)": (pick(ours, "whisper_gpu_power_watts", gpu=index), number(gpu["power.draw"])),
                "power limit (W)": (pick(ours, "whisper_gpu_power_limit_watts", gpu=index),
                                    number(gpu["power.limit"])),
                "SM clock (MHz)": (_div(pick(ours, "whisper_gpu_sm_clock_hertz", gpu=index), 1e6),
                                   number(gpu["clocks.sm"])),
                "ECC corrected (volatile)": (pick(ours, "whisper_gpu_ecc_errors_total", gpu=index, type="corrected"),
                                             number(gpu["ecc.errors.corrected.volatile.total"])),
                "ECC uncorrected (volatile)": (pick(ours, "whisper_gpu_ecc_errors_total", gpu=index,
                                                    type="uncorrected"),
                                               number(gpu["ecc.errors.uncorrected.volatile.total"])),
                "load process memory (MiB)": (_div(pick(ours, "whisper_gpu_process_memory_used_bytes",
                                                        pid=str(load.pid)), MIB),
                                              _div(apps.get(load.pid), MIB)),
            }
            for key, (a, b) in pairs.items():
                if a is not None and b is not None:
                    rows.setdefault(key, []).append((a, b))
                elif (a is None) != (b is None):
                    rows.setdefault(key + " [one side missing]", []).append((a if a is not None else float("nan"),
                                                                             b if b is not None else float("nan")))
            time.sleep(1)
        energy_a = pick(scrape(url), "whisper_gpu_energy_joules_total")
        t_a = time.monotonic()
        time.sleep(5)
        energy_b = pick(scrape(url), "whisper_gpu_energy_joules_total")
        t_b = time.monotonic()
        power_now = number(smi_gpu()["power.draw"])
        print(f"GPU: {gpu['name']} ({gpu['uuid']}), {args.rounds} rounds, exporter GPU interval 250 ms\n")
        print("| reading | exporter (median) | nvidia-smi (median) | median abs. difference |")
        print("|---|---|---|---|")
        for key, values in rows.items():
            a = statistics.median(v[0] for v in values)
            b = statistics.median(v[1] for v in values)
            d = statistics.median(abs(v[0] - v[1]) for v in values)
            print(f"| {key} | {a:.4g} | {b:.4g} | {d:.3g} |")
            if key in ("memory total (MiB)", "power limit (W)") and d > 1:
                failures.append(key)
            if key in ("memory used (MiB)", "load process memory (MiB)") and d > 0.02 * max(b, 1):
                failures.append(key)
        if energy_a is not None and energy_b is not None:
            print(f"| average power from energy counter over 5 s (W) | {(energy_b - energy_a) / (t_b - t_a):.4g} "
                  f"| power.draw now: {power_now} | |")
        if args.out:
            Path(args.out).write_text(json.dumps({k: v for k, v in rows.items()}, indent=1))
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)
        load.terminate()
        load.wait(timeout=60)
    if failures:
        print("\nDISAGREE: " + ", ".join(failures))
        return 1
    return 0


def _div(value: Optional[float], by: float) -> Optional[float]:
    return None if value is None else value / by


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
