"""The measured columns of docs/claims.md: per combo, medians over a GPU class's committed one-sided runs.

    python tools/claims_table.py [baselines/nvidia-h200/runs]

Reads every run file in the folder, keeps one-sided runs (A/B sides carry `environment.ab_run`) and measured records,
and prints per combo: runs, distinct GPUs, the median over runs of it/s (median step), of peak VRAM (GiB, the whole
image), of MS-SSIM and PSNR against the BF16 reference, and the kernel path as recorded; then the ratios the claims
are about, each the ratio of the two medians: against bf16 of the same model and runtime, and nvfp4 against gguf-q8_0.
Reads JSON only (no torch, no fluxgate import).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def one_sided_records(folder: Path) -> dict[str, list[dict]]:
    """Measured records of one-sided runs, by combo id."""
    out: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        if run["environment"].get("ab_run"):
            continue
        for record in run["records"]:
            if record["outcome"] in ("passed", "failed") and not record.get("error"):
                record["_gpu"] = record.get("environment", run["environment"])["gpu"]["uuid"]
                out[record["combo"]].append(record)
    return out


def medians(records: list[dict]) -> dict:
    def med(key: str) -> float | None:
        values = [r["metrics"][key] for r in records if r["metrics"].get(key) is not None]
        return statistics.median(values) if values else None
    labels = sorted({r["metrics"]["kernel_path"]["label"] for r in records})
    return {"runs": len({r["run_id"] for r in records}), "gpus": len({r["_gpu"] for r in records}),
            "it_s": med("it_s"), "peak": med("peak_mem_gib"), "ms_ssim": med("ms_ssim"), "psnr": med("psnr_db"),
            "path": " / ".join(labels)}


def main(folder: Path) -> None:
    table = {combo: medians(records) for combo, records in sorted(one_sided_records(folder).items())}
    print(f"{'combo':32} runs gpus   it/s  peak GiB  MS-SSIM  PSNR dB  kernel path (as recorded)")
    for combo, m in table.items():
        psnr = f"{m['psnr']:7.2f}" if m["psnr"] is not None else "      -"
        print(f"{combo:32} {m['runs']:4} {m['gpus']:4} {m['it_s']:6.3f} {m['peak']:9.2f} {m['ms_ssim']:8.4f} {psnr}"
              f"  {m['path']}")
    print(f"\n{'ratio (of medians)':44} {'it/s':>6} {'VRAM':>6}")
    for combo, m in table.items():
        model, variant = combo[:-1].split("[")
        runtime = "-compile" if variant.endswith("-compile") else ""
        for other, name in ((f"{model}[bf16{runtime}]", "/ bf16"), (f"{model}[gguf-q8_0{runtime}]", "/ q8_0")):
            base = table.get(other)
            if base is None or other == combo or (name == "/ q8_0" and not variant.startswith("nvfp4")):
                continue
            print(f"{combo + ' ' + name:44} {m['it_s'] / base['it_s']:6.3f} {m['peak'] / base['peak']:6.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "baselines/nvidia-h200/runs"))
