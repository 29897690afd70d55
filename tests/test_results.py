"""reports/RESULTS.md is generated from a run's metrics.json: the numbers it prints are the run's, and a
section whose stage has not run is said, not crashed on."""
import json

import pytest

from workbench import results

WARN_UNMOVED = ("run gist-1-s1 unmoved: no epoch beat the starting weights on validation (val top-1 70.0%), so its "
                "checkpoint is the model it started from (lower the learning rate, train longer, or check the captions).")
WARN_COLLAPSED = ("run finetune-classname-1-s0 collapsed: its training loss ended at 2.990, the chance level "
                  "ln(batch) = 2.996, so the model tells no caption from another (lower the learning rate, or check "
                  "the captions).")


def _acc(method, shots, seed, top1, ci, **kw):
    return {"method": method, "shots": shots, "seed": seed, "top1": top1, "top3": min(top1 + 2.0, 100.0),
            "ci95": ci, "n_test": 1200, **kw}


def _metrics() -> dict:
    """A small metrics.json with every section, in the shapes the stages write."""
    attr = {"top1": 0.983, "chance": 0.2, "majority": 0.3, "n": 600}
    return {
        "timing": {"pretrain_s": 12.34, "describe_s": 10.0, "match_s": 9.5, "finetune_s": 75.25,
                   "evaluate_s": 51.0, "align_s": 19.0},
        "pretrain": {
            "model": "wb-tiny|synthetic|abc", "attributes": {"crown_color": attr, "beak_shape": {**attr, "top1": 0.321}},
            "dataset_attributes": {"crown_color": {**attr, "top1": 0.971, "n": 1200},
                                   "beak_shape": {**attr, "top1": 0.654, "n": 1200}},
            "species": {"top1": 0.073, "chance": 1 / 12, "n": 1200, "prompt": "a photo of a {}, a type of bird.",
                        "split": "test", "null_mean": 0.083, "null95": [0.003, 0.193], "null_quantile": 0.41,
                        "top_name_share": 0.44},
            "recipe": {"steps": 3000}, "training": {"train_seconds": 1011.2, "threads": 1, "created": "2026-12-02",
                                                    "torch_version": "2.14.1"}},
        "finetune": {
            "model": "tiny", "pretrained": "synthetic", "device": "cpu", "world_size": 1,
            "config": {"loss": "clip", "epochs": 3, "batch_size": 20, "lr": 1e-4},
            "runs": [
                {"run": "gist-full-s0", "method": "gist", "shots": "full", "status": "done", "steps": 54, "best_epoch": 2, "val_top1": 97.5,
                 "start_val_top1": 96.25, "loss_first_epoch": 2.5, "loss_last_epoch": 1.25, "loss_chance": 2.996},
                {"run": "gist-1-s1", "method": "gist", "shots": 1, "status": "done", "steps": 3, "best_epoch": 0, "val_top1": 70.0,
                 "start_val_top1": 70.0, "loss_first_epoch": 2.0, "loss_last_epoch": 1.9, "loss_chance": 2.485,
                 "warning": WARN_UNMOVED},
                {"run": "finetune-classname-1-s0", "method": "finetune-classname", "shots": 1, "status": "done", "steps": 3, "best_epoch": 1, "val_top1": 71.0,
                 "start_val_top1": 70.0, "loss_first_epoch": 2.995, "loss_last_epoch": 2.99, "loss_chance": 2.996,
                 "warning": WARN_COLLAPSED},
            ]},
        "accuracy": [
            _acc("zero-shot", "full", 0, 7.25, [5.75, 8.75], zero_shot=True, desc_top1=31.5, desc_ci95=[28.9, 34.1],
                 n_descriptions=60),
            _acc("linear-probe", "full", 0, 97.0, [96.0, 97.9], val_policy="full"),
            _acc("gist", "full", 0, 96.9, [96.0, 97.8], val_policy="full"),
            _acc("linear-probe", 1, 0, 72.0, [69.5, 74.5], val_policy="full", n_val=120),
            _acc("linear-probe", 1, 1, 74.0, [71.5, 76.5], val_policy="full", n_val=120),
            _acc("gist", 1, 1, 73.0, [70.5, 75.5], val_policy="full", n_val=120, warning=WARN_UNMOVED),
        ],
        "comparisons": [
            {"a": "gist", "b": "linear-probe", "shots": "full", "diff": -0.1, "ci95": [-0.9, 0.7], "p": 0.8123,
             "n_test": 1200, "seeds": [0]},
            {"a": "gist", "b": "zero-shot", "shots": 1, "diff": 65.75, "ci95": [62.5, 69.25], "p": 0.0004,
             "n_test": 1200, "seeds": [0, 1, 2]},
            {"a": "gist", "b": "finetune-classname", "shots": 5, "diff": 1.25, "ci95": [-0.5, 3.0], "p": 0.16,
             "p_holm": 0.48, "n_test": 1200, "seeds": [0]},
        ],
        "alignment": {
            "dataset": "synthetic", "split": "test", "n_images": 200, "note": "",
            "word_specificity": {"method": "surgery-qqkk",
                                 "pretrained": {"named": {"score": 0.52, "n": 997},
                                                "bare": {"score": 0.21, "n": 997, "named_score": 0.52,
                                                         "vs_named": {"diff": -31.0, "ci95": [-34.25, -27.5], "p": 0.0005}}}},
            "pointing_game": {
                "relevance": {
                    "pretrained": {"score": 0.65, "score_ci95": [0.62, 0.679], "chance": 0.072, "other_parts": 0.149,
                                   "word_specific": True, "n": 997, "per_part": {},
                                   "vs_prior": {"diff": 48.6, "ci95": [45.25, 51.9], "p": 0.0005}},
                    "finetuned": {"score": 0.601, "score_ci95": [0.57, 0.631], "chance": 0.072, "other_parts": 0.16,
                                  "word_specific": True, "n": 997, "per_part": {},
                                  "change": {"diff": -4.9, "ci95": [-7.5, -2.25], "p": 0.002}}},
                "rollout": {"pretrained": {"score": 0.261, "score_ci95": [0.234, 0.289], "chance": 0.072,
                                           "other_parts": None, "word_specific": False, "n": 997, "per_part": {}}},
                "prior": {"baseline": {"score": 0.164, "score_ci95": [0.145, 0.184], "chance": 0.072, "other_parts": 0.106,
                                       "word_specific": False, "image_agnostic": True, "n": 997, "per_part": {}}},
            }},
    }


def _run(tmp_path, metrics: dict, params: bool = True):
    run = tmp_path / "demo"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    if params:
        (run / "params.yaml").write_text(
            "# Resolved configuration of run 'demo': workbench 0.1.0, commit 0123456789abcdef0123, "
            "2026-12-06T19:14:31\ndataset: synthetic\ndataset_options: {n_species: 12}\nseed: 0\n")
    return run


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def test_every_number_comes_from_the_run(tmp_path):
    out = results.write_results(_run(tmp_path, _metrics()), tmp_path / "RESULTS.md")
    text = out.read_text()
    head = text[: text.index("\n## ")]
    assert "commit 0123456789ab" in head and "2026-12-06T19:14:31" in head and "torch " in head and "cores" in head
    t = _section(text, "Time per stage")
    assert "| pretrain | 12.3 |" in t and "| finetune | 75.2 |" in t and "| **total** | 177.1 |" in t
    acc = _section(text, "Accuracy")
    assert "| linear-probe | 97.0 [96.0, 97.9] | 73.0 ± 1.4 (n=2) |" in acc  # two draws: mean ± sd
    assert "| gist | 96.9 [96.0, 97.8] | 73.0 [70.5, 75.5] †1 |" in acc  # one draw: its bootstrap interval
    assert "7.2 (0-shot)" in acc and "31.5 [28.9, 34.1]" in acc
    assert "| linear-probe | 1 | 1 | 74.0 | [71.5, 76.5] |" in acc and "| unmoved |" in acc
    comp = _section(text, "Paired comparisons")
    assert "| gist | linear-probe | full | -0.1 | [-0.9, +0.7] | 0.812 | 1200 | 1 |" in comp
    assert "| gist | zero-shot | 1 | +65.8 | [+62.5, +69.2] | < 0.001 | 1200 | 3 |" in comp
    assert "no difference can be claimed" in comp and "GIST is better" in comp
    assert "| gist | finetune-classname | 5 | +1.2 | [-0.5, +3.0] | 0.160 | 1200 | 1 | 0.480 |" in comp
    # the GIST question's sentences, as evaluate.gist_question words them (whatever their sign)
    from workbench.evaluate import gist_question
    said = gist_question(_metrics()["comparisons"])[1]
    answered = [s for s in said if ": not answered:" not in s]
    assert answered and all(f"- {s}" in comp for s in answered)
    assert f"- {len(said) - len(answered)} question(s) not answered" in comp and ": not answered:" not in comp
    ft = _section(text, "Fine-tuning runs")
    assert "2 of 3 runs collapsed or stayed unmoved" in ft and WARN_UNMOVED in ft and WARN_COLLAPSED in ft
    assert "| gist-full-s0 | done | 54 | 2 | 96.2 | 97.5 | 2.500 | 1.250 | 2.996 | — |" in ft
    # the unmoved count per method and shots, from the runs' own fields (an independent count of the fixture)
    runs = _metrics()["finetune"]["runs"]
    for (method, shots) in {(r["method"], str(r["shots"])) for r in runs}:
        mine = [r for r in runs if r["method"] == method and str(r["shots"]) == shots]
        n_unmoved = sum(r.get("best_epoch") == 0 and r.get("steps", 0) > 0 for r in mine)
        assert f"| {method} | {shots} | {n_unmoved} | {len(mine)} |" in ft
    pg = _section(text, "Pointing game")
    assert "| relevance | pretrained | 0.650 | [0.620, 0.679] | 0.072 | 0.149 | 997 | — | — | — | +48.6 | [+45.2, +51.9] |" in pg
    assert "| prior | baseline | 0.164 | [0.145, 0.184] | 0.072 | 0.106 | 997 |" in pg
    assert "| relevance | finetuned | 0.601 | [0.570, 0.631] | 0.072 | 0.160 | 997 | -4.9 | [-7.5, -2.2] | 0.002 |" in pg
    assert "| rollout | pretrained | 0.261 | [0.234, 0.289] | 0.072 | — | 997 |" in pg
    # rollout is caption-independent: the best caption-specific map is relevance, and 0.164 / 0.650 = 0.25
    assert "Best caption-specific map of the pretrained weights on this run: `relevance`, 0.650; the prior scores 0.25" in pg
    assert "Word specificity of `surgery-qqkk`" in pg and "| pretrained | named | 0.520 | 997 | — | — |" in pg
    assert "| pretrained | bare | 0.210 | 997 | -31.0 | [-34.2, -27.5] |" in pg
    assert "align_default.png" not in text and not (tmp_path / "figures").exists()  # the run has no figure
    pre = _section(text, "The pretrained tiny CLIP")
    assert "| crown_color | 0.983 | 0.200 | 600 | 0.971 | 1200 |" in pre and "| beak_shape | 0.321 |" in pre
    assert "top-1 7.3% against 8.3% chance" in pre and "0.3% to 19.3%" in pre and "44%" in pre
    assert "3000 steps in 1011 s" in pre
    assert "Not in this run" not in text


def test_the_default_alignment_figure_is_copied_beside_the_page_and_shown(tmp_path):
    m = _metrics()
    m["alignment"]["default_method"] = "surgery-qqkk"
    run = _run(tmp_path, m)
    (run / "figures").mkdir()
    (run / "figures" / "align_default.png").write_bytes(b"\x89PNG fake")
    out = results.write_results(run, tmp_path / "pages" / "RESULTS.md")
    assert (tmp_path / "pages" / "figures" / "align_default.png").read_bytes() == b"\x89PNG fake"
    pg = _section(out.read_text(), "Pointing game")
    assert "![default alignment map](figures/align_default.png)" in pg and "`surgery-qqkk`" in pg
    assert not list((tmp_path / "pages" / "figures").glob("*.tmp"))


def test_a_missing_section_is_said_not_crashed_on(tmp_path):
    m = _metrics()
    for k in ("accuracy", "comparisons", "finetune", "alignment", "pretrain"):
        m.pop(k)
    text = results.render(_run(tmp_path, m, params=False))
    for title, stage in (("Accuracy", "evaluate"), ("Paired comparisons", "evaluate"), ("Fine-tuning runs", "finetune"),
                         ("Pointing game", "align"), ("The pretrained tiny CLIP", "pretrain")):
        assert "Not in this run's metrics.json" in _section(text, title), title
        assert f"--stages {stage}" in _section(text, title), title
    assert "| finetune | 75.2 |" in text and "started unknown" in text


def test_skipped_pretrain_and_no_runs_flagged(tmp_path):
    m = _metrics()
    m["pretrain"] = {"skipped": True, "model": "ViT-B-32", "pretrained": "openai"}
    for r in m["finetune"]["runs"]:
        r.pop("warning", None)
    text = results.render(_run(tmp_path, m))
    assert "Skipped: the run's model is `ViT-B-32`" in text and "0 of 3 runs collapsed or stayed unmoved." in text


def test_main_without_a_run_exits_2(tmp_path, capsys):
    assert results.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "R.md")]) == 2
    assert "workbench run demo" in capsys.readouterr().err and not (tmp_path / "R.md").exists()
    run = _run(tmp_path, _metrics())
    assert results.main(["--run", str(run), "--out", str(tmp_path / "R.md")]) == 0
    assert (tmp_path / "R.md").read_text().startswith("# Results")


@pytest.mark.parametrize("ci", [None, [1.0], ["a", "b"]])
def test_odd_intervals_print_a_dash(ci):
    assert results.interval(ci) is None and results.table(["x"], [[results.interval(ci)]])[-1] == "| — |"
