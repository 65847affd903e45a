"""scripts/benchmark.py end to end with tiny settings: table, JSON and plot from one command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def test_benchmark_quick_writes_table_and_plot(tmp_path):
    import benchmark

    report = benchmark.main(["--quick", "--sparsities", "0.5", "--methods", "dense", "scratch", "hesso", "wanda_sp",
                             "hesso_kd", "hesso_cric_kd", "magnitude_kd", "--seeds", "2", "--references", "gqa",
                             "--skip_speed", "--section", "pruning", "--out", str(tmp_path / "res"),
                             "--cache", str(tmp_path / "cache")])
    text = report.read_text()
    assert "| 50% | HESSO |" in text and "| 50% | Wanda-sp" in text and "dense + same training" in text
    assert "| 50% | HESSO + distillation" in text and "| 50% | L2 magnitude, one-shot + train with distillation" in text
    assert "| 50% | limit: the pruned shape trained from scratch" in text
    assert "Dense control with the recovery budget" in text
    # CRIC's analysis: its trials' statistic, the same statistic's noise on the control, what changed
    assert "CRIC (6 trials of 2 steps over 2 runs" in text and "with no trial: mean" in text
    assert text.count("removed groups differ") == 2
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    rows = res["rows"]
    pruned = [r for r in rows if r["method"] != "dense"]
    p0 = pruned[0]["params"]
    assert all(abs(r["params"] - p0) <= 0.02 * p0 for r in pruned)  # same size, up to tiny-model granularity
    assert all(r["eval_ppl"] > 1 for r in rows)
    assert sorted({r["seed"] for r in rows if r["method"] == "hesso"}) == [0, 1]  # two seeds, two runs
    for e in res["aggregate"]:  # the table's mean and range are those of the seeds' runs
        runs = [r["eval_ppl"] for r in rows if (r["method"], r["sparsity"]) == (e["method"], e["sparsity"])]
        assert e["n"] == len(runs) == (1 if e["method"] == "scratch" else 2)
        assert abs(e["ppl"] - sum(runs) / len(runs)) < 1e-9 and e["lo"] == min(runs) and e["hi"] == max(runs)
    line = next(ln for ln in text.splitlines() if ln.startswith("| 50% | HESSO |"))
    assert f"[{min(r['eval_ppl'] for r in rows if r['method'] == 'hesso'):.2f}-" in line
    assert (tmp_path / "res" / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    # the cached reference model is reused by a second run
    assert len(list((tmp_path / "cache").iterdir())) == 1

    # --update reruns only what it names and keeps every other row; other budget settings are refused
    common = ["--quick", "--sparsities", "0.5", "--seeds", "2", "--references", "gqa", "--skip_speed",
              "--section", "pruning", "--out", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")]
    try:
        benchmark.main(common + ["--update", "--methods", "magnitude_kd", "--lr", "0.001"])
        raise AssertionError("an update with another recovery budget was accepted")
    except SystemExit as e:
        assert e.code == 2
    text = benchmark.main(common + ["--update", "--methods", "magnitude_kd"]).read_text()
    after = json.loads((tmp_path / "res" / "results.json").read_text())
    assert len(after["rows"]) == len(rows) and [r["command"] for r in after["runs"]][1].endswith("magnitude_kd")
    assert {(r["method"], r["seed"]) for r in after["rows"]} == {(r["method"], r["seed"]) for r in rows}
    assert [r["method"] for r in after["rows"][-2:]] == ["magnitude_kd", "magnitude_kd"]
    assert "| 50% | HESSO + distillation" in text and text.count("- command:") == 2

    # --report rewrites the table from results.json alone: same rows, same text, no run, no new command
    (tmp_path / "res" / "results.md").write_text("stale")
    again = benchmark.main(["--report", "--out", str(tmp_path / "res"), "--cache", str(tmp_path / "nothing")])
    assert again.read_text() == text and not (tmp_path / "nothing").exists()
    assert json.loads((tmp_path / "res" / "results.json").read_text())["rows"] == after["rows"]
    try:
        benchmark.main(["--report", "--out", str(tmp_path / "empty")])
        raise AssertionError("--report without results.json was accepted")
    except SystemExit as e:
        assert e.code == 2


def test_kept_column_lists_each_seeds_shape_when_they_differ():
    import benchmark

    a = {"heads": 4, "kv_heads": 1, "ffn": 352}
    b = {"heads": 8, "kv_heads": 2, "ffn": 248}
    rows = [{"method": "m", "sparsity": 0.5, "seed": s, "eval_ppl": 30.0 + s, "params": p, "kept": k}
            for s, p, k in ((0, 100, a), (1, 104, b), (2, 104, b))]
    (e,) = benchmark.aggregate(rows)
    assert benchmark.kept_cell(e) == "4 / 1 / 352 (seed 0); 8 / 2 / 248 (seeds 1, 2)"
    assert e["params_range"] == (100, 104)
    (same,) = benchmark.aggregate(rows[1:])
    assert benchmark.kept_cell(same) == "8 / 2 / 248"


def test_real_model_calibration_is_a_seeded_random_draw_and_the_toy_keeps_its_shuffled_blocks():
    """SmolLM2's training blocks are in document order: its one-shot rows draw calibration at random with
    the row's seed, as `hf-oto oneshot` does; the toy references' blocks are shuffled already."""
    import benchmark
    import torch

    blocks = torch.arange(1000).reshape(500, 2)  # block i holds 2i, 2i+1

    def drawn(*argv):
        batches = benchmark.calibration(blocks, benchmark.parse_args(["--calib_batches", "3", "--batch", "4", *argv]))
        assert [tuple(b["input_ids"].shape) for b in batches] == [(4, 2)] * 3
        return torch.cat([b["input_ids"][:, 0] // 2 for b in batches]).tolist()

    assert drawn() == list(range(12))  # toy: the first blocks
    real = drawn("--reference", "smollm2")
    assert len(set(real)) == 12 and real != list(range(12)) and max(real) > 100  # spread over the text
    assert drawn("--reference", "smollm2") == real and drawn("--reference", "smollm2", "--seed", "1") != real


def test_resuming_a_folder_keeps_its_calibration(tmp_path):
    """A real-model folder measured before calibration was drawn at random resumes with its first blocks
    (its rows stay comparable), a new folder draws at random."""
    import benchmark
    import torch

    stored = benchmark.settings(benchmark.parse_args(["--reference", "smollm2"]))
    assert stored.pop("calibration") == "random"  # a fresh run
    (tmp_path / "results.json").write_text(json.dumps({"settings": stored, "rows": []}))
    a = benchmark.parse_args(["--reference", "smollm2", "--resume", "--out", str(tmp_path)])
    assert benchmark.settings(a)["calibration"] == "first"
    assert benchmark.calibration(torch.arange(100).reshape(50, 2), a)[0]["input_ids"][0, 0] == 0


def test_benchmark_per_layer_ffn_layout_reaches_the_same_size_and_lists_the_widths(tmp_path):
    """--layout per_layer_ffn: every method ends at the budget (HESSO too, where the FFN alone cannot
    reach 70% and half of the heads must go), and the table gives the FFN widths' range."""
    import benchmark

    common = ["--quick", "--sparsities", "0.7", "--seeds", "1", "--references", "mha", "--skip_speed",
              "--section", "pruning", "--layout", "per_layer_ffn", "--out", str(tmp_path / "res"),
              "--cache", str(tmp_path / "cache")]
    try:
        benchmark.main(common + ["--methods", "scratch"])
        raise AssertionError("a scratch row (uniform shapes only) was accepted with per_layer_ffn")
    except SystemExit as e:
        assert e.code == 2
    text = benchmark.main(common + ["--methods", "hesso_kd", "taylor_kd"]).read_text()
    rows = json.loads((tmp_path / "res" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"hesso_kd", "taylor_kd"}
    for r in rows:
        assert abs(r["pruned_fraction"] - 0.7) <= 0.01  # HESSO stopped at 0.643 before the planner exchange
    widths = [r["kept"]["ffn"] for r in rows if isinstance(r["kept"]["ffn"], list)]
    assert widths and all(len(w) == 2 and min(w) >= 8 and w[0] != w[1] for w in widths)  # 2 layers, unequal
    assert "(mean " in text and "per_layer_ffn layout" in text and "ffn_widths.png" in text
    assert (tmp_path / "res" / "ffn_widths.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_qfa_rows_runs_only_the_rows_asked_for(tmp_path):
    import benchmark

    benchmark.main(["--quick", "--section", "qfa", "--qfa_rows", "rtn", "--no-qfa_hesso", "--qfa_budgets",
                    "--out", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")])
    res = json.loads((tmp_path / "res" / "qfa.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"RTN base, no training"}
    assert sorted(r["config"] for r in res["rows"]) == [f"uniform {b}-bit" for b in (2, 3, 4)]
    # a resumed run keeps the notes written into qfa.json by hand
    (tmp_path / "res" / "qfa.json").write_text(json.dumps(dict(res, notes=["hand-written note"])))
    benchmark.main(["--quick", "--resume", "--section", "qfa", "--qfa_rows", "rtn", "--no-qfa_hesso", "--qfa_budgets",
                    "--out", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")])
    assert json.loads((tmp_path / "res" / "qfa.json").read_text())["notes"] == ["hand-written note"]
    assert "- note: hand-written note" in (tmp_path / "res" / "qfa.md").read_text()


def test_benchmark_qfa_section_quick_writes_table_and_plot(tmp_path):
    import benchmark

    report = benchmark.main(["--quick", "--section", "qfa", "--out", str(tmp_path / "res"),
                             "--cache", str(tmp_path / "cache")])
    text = report.read_text()
    for method in ("RTN base, no training", "GPTQ base, no training", "QA-LoRA, one run per width", "QFA, one run",
                   "QFA + HESSO 50%"):
        assert f"| {method}" in text, method
    res = json.loads((tmp_path / "res" / "qfa.json").read_text())
    searched = [r for r in res["rows"] if r["config"].startswith("searched")]
    assert res["bits"] == [2, 3, 4] and res["grid"] == "signed" and "symmetric (signed scales)" in text
    assert {r["config"] for r in searched} == {f"searched, <= {b} bits" for b in (2.5, 3.0, 3.5)}
    assert searched and all(r["avg_bits"] <= float(r["config"].split("<= ")[1].split()[0]) + 1e-9 for r in searched)
    mixes = [r for r in res["rows"] if r.get("random")]  # random allocations at each searched budget
    for method in {r["method"] for r in searched}:  # each budget between two widths, for every searched model
        assert sorted(r["config"] for r in mixes if r["method"] == method) == [
            f"random mix, <= {b} bits (mean of 4)" for b in (2.5, 3.5)]
    for r in mixes:
        budget = float(r["config"].split("<= ")[1].split()[0])
        assert budget - 0.5 < r["avg_bits"] <= budget + 1e-9 and r["ppl_range"][0] <= r["ppl"] <= r["ppl_range"][1]
    assert all(r["ppl"] > 1 for r in res["rows"])
    assert res["qfa_hesso_export_mib"] > 0
    assert (tmp_path / "res" / "qfa.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_depth_rows_remove_whole_layers(tmp_path):
    """--granularity depth: HESSO and ShortGPT's block influence both meet the budget by removing one of the
    two layers, and the table names the layers kept."""
    import benchmark

    common = ["--quick", "--sparsities", "0.5", "--seeds", "1", "--references", "gqa", "--skip_speed",
              "--section", "pruning", "--out", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")]
    try:
        benchmark.main(common + ["--methods", "block_influence_kd"])
        raise AssertionError("a layer-removal row was accepted with --granularity width")
    except SystemExit as e:
        assert e.code == 2
    text = benchmark.main(common + ["--granularity", "depth", "--methods", "hesso_kd", "block_influence_kd"])
    text = text.read_text()
    rows = json.loads((tmp_path / "res" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"hesso_kd", "block_influence_kd"}
    assert all(r["kept"]["layers"] == 1 and r["pruned_fraction"] == 0.5 for r in rows)
    assert " in 1 layers" in text and "ShortGPT" in text
