"""Cost of a whole few-shot sweep relative to one embedding pass of the same data and model.

The sweep (methods x shot counts x seeds, one record each) embeds the dataset once through the
feature cache and fits every head on cached rows. Measured side by side in one process:

- ``embed``: one plain forward pass over every image (no cache, no hashing);
- ``sweep``: the sweep from a cold cache, without dataset loading and model construction
  (a single pass needs those too), i.e. the cache key, the one pass, all heads, metrics and
  records;
- ``warm sweep``: the same sweep again into a new folder with the features on disk.

Target: sweep / embed below 1.2 for the frozen-backbone methods, on a backbone large enough for
the embedding to dominate (default: timm ViT-S/16 at 224, random init; the figure in the README
is ViT-Tiny, shots 1,2, 3 seeds). The head time of each method (hyper-parameters selected within
the K-shot budget, e.g. the linear probe's C by cross-validation on the support set) is printed
too.

    python benchmarks/bench_fewshot.py --patients-per-site 40 --shots 1,2,4 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

TARGET = 1.2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="timm:vit_small_patch16_224")
    p.add_argument("--patients-per-site", type=int, default=40)
    p.add_argument("--methods", default="prototype,knn,tip-adapter,linear-probe")
    p.add_argument("--shots", default="1,2,4")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    os.environ.setdefault("CLINADAPT_QUIET", "1")
    os.environ.pop("CLINADAPT_CACHE", None)  # measure this run's cache, not a shared one

    import torch

    from clinadapt.config import RunConfig
    from clinadapt.data import load_dataset
    from clinadapt.features import embed
    from clinadapt.fewshot_sweep import parse_int_list, run_fewshot_sweep
    from clinadapt.runner import build_classifier

    methods = args.methods.split(",")
    shots = parse_int_list(args.shots, "--shots")
    seeds = list(range(args.seeds))
    data_options = {"patients_per_site": args.patients_per_site}
    ds = load_dataset("clinical-shift", **data_options)
    with tempfile.TemporaryDirectory() as tmp:
        base = RunConfig(
            model=args.model,
            pretrained=False,
            data_options=data_options,
            batch_size=args.batch_size,
            device=args.device,
            out_dir=os.path.join(tmp, "cold"),
        )
        model = build_classifier(base, ds.num_classes)
        embed(model, ds.subset(range(min(len(ds), args.batch_size))), args.batch_size, args.device)
        t = time.perf_counter()
        embed(model, ds, args.batch_size, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        embed_s = time.perf_counter() - t
        del model

        cold = run_fewshot_sweep(base, methods, shots, seeds)
        cold_s = cold.timings["total_s"] - cold.timings["load_s"]
        # a new output folder, the features already cached: only the heads remain
        os.environ["CLINADAPT_CACHE"] = os.path.join(tmp, "cold", "cache")
        warm = run_fewshot_sweep(
            base.model_copy(update={"out_dir": os.path.join(tmp, "warm")}), methods, shots, seeds
        )
        os.environ.pop("CLINADAPT_CACHE")
        warm_s = warm.timings["total_s"] - warm.timings["load_s"]

    runs = len(cold.records)
    fit_by_method: dict[str, float] = {}
    for rec in warm.records:  # the heads alone (hyper-parameter selection included), per method
        name = rec["method"]["name"]
        fit_by_method[name] = fit_by_method.get(name, 0.0) + rec["timings"]["fit_s"]
    figures = {
        "model": args.model,
        "device": args.device,
        "images": len(ds),
        "runs": runs,
        "methods": methods,
        "shots": shots,
        "seeds": len(seeds),
        "embed_pass_s": round(embed_s, 3),
        "sweep_cold_s": round(cold_s, 3),
        "sweep_cold_embed_s": round(cold.timings["embed_s"], 3),
        "sweep_cold_heads_s": round(cold.timings["runs_s"], 3),
        "sweep_warm_s": round(warm_s, 3),
        "warm_fit_s_by_method": {k: round(v, 3) for k, v in fit_by_method.items()},
        "ratio_cold_sweep_to_embed": round(cold_s / embed_s, 3),
        "ratio_warm_sweep_to_embed": round(warm_s / embed_s, 3),
        "images_embedded_cold": cold.cache["embedded_images"],
        "images_embedded_warm": warm.cache["embedded_images"],
        "ratio_if_each_run_embedded": runs,
        "target": TARGET,
        "meets_target": cold_s / embed_s < TARGET,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"{args.model} on {len(ds)} images ({args.device}); {runs} runs: {methods} x {shots} x {len(seeds)} seeds"
    )
    print(f"  one embedding pass           {embed_s:8.2f} s   1.00x")
    print(
        f"  sweep, cold cache            {cold_s:8.2f} s   {cold_s / embed_s:.2f}x   "
        f"(embedding {cold.timings['embed_s']:.2f} s, {runs} heads + records {cold.timings['runs_s']:.2f} s)"
    )
    print(f"  sweep, features on disk      {warm_s:8.2f} s   {warm_s / embed_s:.2f}x")
    fits = ", ".join(f"{k} {v:.2f} s" for k, v in fit_by_method.items())
    print(f"  heads (fits and selection), features on disk: {fits}")
    print(f"  each run embedding its own   ~{runs:6d}x (no cache)")
    print(
        f"  target: cold sweep < {TARGET}x one pass -> {'met' if figures['meets_target'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
