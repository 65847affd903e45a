"""The typed pruning manifest: one reader and writer, old files read once, the card's method line from what ran."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tiny import tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.errors import ExportError
from hf_oto.export.card import method_text
from hf_oto.manifest import MANIFEST_FILE, VERSION, HESSORecord, Manifest
from hf_oto.optim import HESSOConfig
from hf_oto.optim.oneshot import ONESHOT_CRITERIA

OLD = Path(__file__).resolve().parent / "fixtures" / "compat_v0_1" / "export_stock"


def test_a_version_1_manifest_reads_into_the_same_fields_and_writes_back_as_the_current_version(tmp_path):
    raw = json.loads((OLD / MANIFEST_FILE).read_text())
    assert "version" not in raw  # written by hf-oto 0.1
    m = Manifest.read(OLD)
    assert (m.model_type, m.params_before, m.params_after, m.layout) == (
        raw["model_type"], raw["params_before"], raw["params_after"], raw["layout"])
    assert [(s.module, s.kind, s.layer, s.groups, list(s.kept)) for s in m.sets] == [
        (s["module"], s["kind"], s["layer"], s["groups"], s["kept"]) for s in raw["sets"]]
    m.write(tmp_path)
    again = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert again.pop("version") == VERSION
    assert {k: v for k, v in again.items() if v not in (None, {})} == {k: v for k, v in raw.items() if v is not None}
    assert Manifest.read(tmp_path) == m


def test_unknown_keys_survive_and_a_newer_version_or_a_foreign_file_is_one_clear_error(tmp_path):
    raw = json.loads((OLD / MANIFEST_FILE).read_text())
    m = Manifest.from_dict(dict(raw, future_field={"x": 1}))
    assert m.other == {"future_field": {"x": 1}} and m.to_dict()["future_field"] == {"x": 1}
    with pytest.raises(ExportError, match="version 99; this hf-oto reads up to"):
        Manifest.from_dict(dict(raw, version=99))
    with pytest.raises(ExportError, match="lacks sets"):
        Manifest.from_dict({k: v for k, v in raw.items() if k != "sets"})
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ExportError, match="is corrupt"):
        Manifest.read(tmp_path)


def test_construct_subnet_returns_the_model_and_its_manifest_and_attaches_nothing(tmp_path):
    model = tiny_model("llama", intermediate_size=64)
    space = discover_groups(model)
    zero_groups(model, space, [g.name for g in space if g.kind == "ffn_channel" and g.name.endswith((".0", ".1"))])
    subnet = construct_subnet(model, space, layout="uniform")
    assert not hasattr(subnet.model, "hf_oto_manifest")
    assert subnet.manifest.params_after == sum(p.numel() for p in subnet.model.parameters())
    assert subnet.manifest.kept_by_kind()["ffn_channel"] == (2 * 62, 2 * 64)
    with pytest.raises(ExportError, match="takes what construct_subnet returns"):
        save_pruned(subnet.model, tmp_path / "x")
    out = save_pruned(subnet, tmp_path / "out", extra_manifest={"eval": {"eval_perplexity": 3.0}})
    written = Manifest.read(out)
    assert written.sets == subnet.manifest.sets and written.export_format == "stock"
    assert written.eval == {"eval_perplexity": 3.0}


def _record(**kw) -> HESSORecord:
    return HESSORecord.from_dict(dict(HESSOConfig(target_sparsity=0.3, **kw).to_dict(), target_params=1000,
                                      cric=None))


@pytest.mark.parametrize("criterion, selection, pricing, says", [
    ("fisher", "per_param", "measured", ["empirical Fisher", "per parameter freed", "loss its removal measured"]),
    ("taylor", "saliency", "saliency", ["first-order Taylor", "lowest score first", "criterion's own units"]),
    ("hesso", "saliency", "saliency", ["HESSO's weighted saliency", "measured at each period start"]),
    ("wanda_sp", "saliency", "measured", ["activation-weighted magnitude", "training passes", "lowest score first"]),
])
def test_the_cards_method_line_states_the_criterion_selection_and_pricing_that_ran(criterion, selection, pricing,
                                                                                  says):
    m = Manifest.read(OLD).with_(hesso=_record(criterion=criterion, selection=selection, pricing=pricing))
    text = method_text(m)
    for phrase in says:
        assert phrase in text, (phrase, text)
    others = {"fisher": "Fisher", "taylor": "Taylor", "hesso": "HESSO's weighted", "wanda_sp": "Wanda-sp"}
    assert all(word not in text for c, word in others.items() if c != criterion)


def test_the_method_line_of_an_ema_run():
    m = Manifest.read(OLD).with_(hesso=_record(criterion="hesso", saliency_ema=0.9))
    assert "EMA of 0.9" in method_text(m)


@pytest.mark.parametrize("criterion", ONESHOT_CRITERIA)
def test_the_method_line_of_a_oneshot_export_names_its_criterion(criterion):
    oneshot = {"criterion": criterion, "calibration_batches": 8, "batch_size": 4, "block_size": 256,
               "target_sparsity": 0.3, "layout": "uniform", "ffn_multiple": 32, "pruned_fraction": 0.301,
               "pricing": "measured", "granularity": "depth" if criterion == "block_influence" else "width",
               "experts": criterion == "routing"}
    text = method_text(Manifest.read(OLD).with_(oneshot=oneshot))
    assert f"One-shot `{criterion}`" in text and "30.1%" in text and "loss its removal measured" in text
    assert ("whole decoder layers" in text) == (criterion == "block_influence")
    assert ("Whole routed experts" in text) == (criterion == "routing")


def test_records_read_their_earlier_json_forms_and_write_them_back_unchanged():
    """A HESSO record from before criterion, selection and pricing existed reads as what ran then, and the
    JSON form round-trips (optional fields written only when they differ from that)."""
    old = {"target_sparsity": 0.5, "target_params": 1000, "layout": "uniform", "start_pruning_step": 2,
           "pruning_steps": 10, "pruning_periods": 5, "ffn_multiple": 8, "min_keep": 1,
           "weights": {"magnitude": 0.25}, "saliency_ema": None, "ema_interval": 10, "tolerance": 0.01, "cric": None}
    record = HESSORecord.from_dict(old)
    assert (record.criterion, record.selection, record.pricing, record.granularity) == (
        "hesso", "saliency", "saliency", "width")
    assert HESSORecord.from_dict(record.to_dict()) == record
    assert record.changed(dataclasses.replace(record, criterion="fisher", prices=({"period": 0},))) == ["criterion"]
    with pytest.raises(ExportError, match="the hesso record lacks target_params"):
        HESSORecord.from_dict({k: v for k, v in old.items() if k != "target_params"})


def test_the_replay_share_round_trips_and_only_a_replayed_run_says_so():
    plain = Manifest.read(OLD).with_(hesso=_record())
    assert plain.replay_fraction is None and "sampled itself" not in method_text(plain)
    replayed = Manifest.from_dict(plain.with_(replay_fraction=0.25).to_dict())
    assert replayed.replay_fraction == 0.25 and "replay_fraction" not in replayed.other
    assert "25% of the training draws were text the source model sampled itself" in method_text(replayed)
