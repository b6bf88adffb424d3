"""The predecessor's manifest tests (training/fleet, ../shared/predecessor/test_manifest.txt), translated.

Its manifests had no ``[models.*]`` declarations (its models were a fixed list in code), so each
translation declares the models it uses (PREDECESSOR_MODELS); everything else is its text as
written: a top-level ``name``, ``[hosts.<id>]`` with ``allow_jobs``/``deny_jobs`` on models,
``[[jobs]]`` with model, mode, hyper, split_recipe, seed. Each asserts what its test asserted.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from trainfleet.broker.errors import ManifestError
from trainfleet.broker.names import host_of_token, host_token, is_host_id
from trainfleet.broker.tickets import host_class, ticket_class
from trainfleet.controller.manifest import parse_manifest

# What the predecessor knew without being told: its models and their modes.
PREDECESSOR_MODELS = """
[models.gbt]
command = ["{python}", "-m", "training.trainer.run", "--model", "gbt"]
modes = ["realistic", "oracle"]
[models.gbt.hyper.lr]
type = "float"
default = 0.1

[models.transformer]
command = ["{python}", "-m", "training.trainer.run", "--model", "transformer"]
modes = ["realistic", "oracle"]
[models.transformer.hyper.epochs]
type = "int"
default = 10
[models.transformer.hyper.batch_size]
type = "int"
default = 64
"""


def load(body: str):
    """The predecessor's manifest text plus the model declarations it lacked."""
    return parse_manifest(body + PREDECESSOR_MODELS, file="training_manifest.toml")


def test_load_minimal():
    m = load('schema_version = 1\nname = "test"\n\n[[jobs]]\nname = "gbt-r"\nmodel = "gbt"\nmode = "realistic"\n')
    assert m.name == "test"
    assert len(m.jobs) == 1
    assert m.jobs[0].model == "gbt"
    assert m.jobs[0].mode == "realistic"
    assert m.to_json()["name"] == "test"


def test_unknown_model_rejected():
    body = 'schema_version = 1\nname = "test"\n[[jobs]]\nname = "bogus"\nmodel = "transformer_xl"\nmode = "realistic"\n'
    with pytest.raises(ManifestError, match="is not declared"):
        load(body)


def test_unknown_mode_rejected():
    with pytest.raises(ManifestError, match="mode"):
        load('schema_version = 1\n[[jobs]]\nname = "x"\nmodel = "gbt"\nmode = "weirdo"\n')


def test_duplicate_job_id_rejected():
    """Same model+mode+hyper → same job_id → operator must disambiguate."""
    body = (
        'schema_version = 1\n[[jobs]]\nname = "first"\nmodel = "gbt"\nmode = "realistic"\n\n'
        '[[jobs]]\nname = "duplicate-by-content"\nmodel = "gbt"\nmode = "realistic"\n'
    )
    with pytest.raises(ManifestError, match="same content"):
        load(body)


def test_disambiguation_via_hyper():
    """Same model+mode but different hyper → different job_ids → OK."""
    body = (
        'schema_version = 1\n[[jobs]]\nname = "lr1"\nmodel = "gbt"\nmode = "realistic"\nhyper.lr = 0.1\n\n'
        '[[jobs]]\nname = "lr2"\nmodel = "gbt"\nmode = "realistic"\nhyper.lr = 0.05\n'
    )
    m = load(body)
    assert m.jobs[0].job_id != m.jobs[1].job_id


def test_host_allow_deny():
    body = (
        'schema_version = 1\n[hosts.tiny]\nallow_jobs = ["gbt"]\n[hosts.huge]\ndeny_jobs = ["transformer"]\n\n'
        '[[jobs]]\nname = "x"\nmodel = "gbt"\nmode = "realistic"\n'
        '[[jobs]]\nname = "gbt"\nmodel = "transformer"\nmode = "realistic"\n'
    )
    m = load(body)
    gbt, transformer = m.jobs
    assert m.hosts["tiny"].permits(gbt)[0]
    assert not m.hosts["tiny"].permits(transformer)[0]  # named gbt, but its model is transformer
    assert m.hosts["huge"].permits(gbt)[0]
    assert not m.hosts["huge"].permits(transformer)[0]


def test_job_id_stable_across_loads():
    src = (
        'schema_version = 1\n[[jobs]]\nname = "stable"\nmodel = "transformer"\nmode = "oracle"\n'
        "hyper.epochs = 80\nhyper.batch_size = 256\n"
    )
    assert load(src).jobs[0].job_id == load(src).jobs[0].job_id


def test_priority_default_zero():
    m = load('schema_version = 1\n[[jobs]]\nname = "x"\nmodel = "gbt"\nmode = "realistic"\n')
    assert m.jobs[0].priority == 0


# -- what else its manifests carried ------------------------------------------------------


JOB = '[[jobs]]\nname = "x"\nmodel = "gbt"\nmode = "realistic"\n'


def test_split_recipe_is_the_data_recipe_and_leaves_other_ids_alone():
    plain = load("schema_version = 1\n" + JOB).jobs[0]
    # The id of a job without a recipe is what it always was: data {} in the identity.
    identity = {"model": "gbt", "mode": "realistic", "hyper": {"lr": 0.1}, "data": {}, "train_hosts": [], "seed": 0}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    assert plain.job_id == hashlib.sha256(canonical.encode()).hexdigest()
    table = load("schema_version = 1\n" + JOB + 'split_recipe = { split = "v2", test_fraction = 0.2 }\n').jobs[0]
    as_data = load("schema_version = 1\n" + JOB + 'data = { split = "v2", test_fraction = 0.2 }\n').jobs[0]
    assert table.data == {"split": "v2", "test_fraction": 0.2}
    assert table.job_id == as_data.job_id != plain.job_id
    named = load("schema_version = 1\n" + JOB + 'split_recipe = "v2"\n').jobs[0]
    assert named.data == {"split": "v2"}
    with pytest.raises(ManifestError, match="not both"):
        load("schema_version = 1\n" + JOB + 'split_recipe = "v2"\ndata = { split = "v2" }\n')
    with pytest.raises(ManifestError, match="split_recipe"):
        load("schema_version = 1\n" + JOB + "split_recipe = 3\n")


def test_dotted_host_ids_load_and_map_to_distinct_tokens():
    body = (
        'schema_version = 1\nname = "cis490 training"\n[hosts."pi.lan"]\nallow_jobs = ["gbt"]\n'
        "[hosts.pi-lan]\n[hosts.pi_lan]\n" + JOB + 'allowed_hosts = ["pi.lan"]\n'
    )
    m = load(body)
    assert m.name == "cis490 training"
    assert set(m.hosts) == {"pi.lan", "pi-lan", "pi_lan"}
    spec = m.jobs[0]
    assert spec.constraints.allowed_hosts == ("pi.lan",)
    assert ticket_class(spec) == host_class("pi.lan") == "host.pi=lan"
    tokens = {host_token(h) for h in ("pi.lan", "pi-lan", "pi_lan", "pi.lan.x", "pi")}
    assert len(tokens) == 5 and all("." not in t for t in tokens)
    assert host_of_token(host_token("a.b-c_d.e")) == "a.b-c_d.e"
    assert host_token("gpu_box-2") == "gpu_box-2"  # ids without dots keep their tokens
    for bad in ("pi..lan", ".pi", "pi.", "pi lan", "pi=lan", "pi*", "pi>", ""):
        assert not is_host_id(bad)
        with pytest.raises(ValueError):
            host_token(bad)
