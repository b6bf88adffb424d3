"""Manifest loading: validation problems name file, job and field; job ids are stable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trainfleet.broker.errors import ManifestError, ManifestProblem
from trainfleet.broker.schema import Constraints, JobSpec
from trainfleet.broker.tickets import ticket_class
from trainfleet.controller.manifest import (
    HostPolicy,
    Manifest,
    job_id_for,
    load_manifest,
    parse_manifest,
)

BASE = """\
schema_version = 1

[settings]
prefer_cuda_grace_s = 300.0
max_attempts = 3

[models.mlp]
command = ["{python}", "-m", "trainfleet.examples.torch_mlp"]
modes = ["classify", "autoencode"]
data = { dataset = "digits", split = 0.2 }
requires = ["torch"]

[models.mlp.hyper.epochs]
type = "int"
default = 5
min = 1
max = 100

[models.mlp.hyper.lr]
type = "float"
default = 0.01
min = 0.0
max = 1.0

[models.mlp.hyper.act]
type = "str"
default = "relu"
choices = ["relu", "tanh"]

[models.mlp.hyper.bias]
type = "bool"
default = true

[models.sk]
command = ["{python}", "-m", "trainfleet.examples.sk_tree"]
modes = ["fit"]

[models.sk.hyper.depth]
type = "int"

[hosts.pi-1]
allow_jobs = ["sk*"]
deny_jobs = ["*big*"]
max_cores = 2.0
max_ram_gib = 4.0
cpu_slots = 1
gpu_slots = 0
serve_cpu = true
"""

MLP_JOB = """
[[jobs]]
name = "mlp-classify-s1"
model = "mlp"
mode = "classify"
seed = 1
"""


def write(tmp_path: Path, text: str, name: str = "fleet.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, jobs: str, base: str = BASE) -> Manifest:
    return load_manifest(write(tmp_path, base + jobs))


def load_error(tmp_path: Path, jobs: str, base: str = BASE) -> tuple[ManifestError, Path]:
    path = write(tmp_path, base + jobs)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value, path


def problem(err: ManifestError, path: Path, job: str | None, field: str | None) -> ManifestProblem:
    """The problem reported for (job, field); its text must name the file, job and field."""
    found = [p for p in err.problems if p.job == job and p.field == field]
    assert found, f"no problem for job={job!r} field={field!r} in:\n{err}"
    text = str(found[0])
    assert text.startswith(str(path))
    if job is not None:
        assert f"job {job}" in text
    if field is not None:
        assert f"field {field!r}" in text
    return found[0]


def job_id(tmp_path: Path, jobs: str, name: str = "fleet.toml") -> str:
    manifest = load_manifest(write(tmp_path, BASE + jobs, name))
    assert len(manifest.jobs) == 1
    return manifest.jobs[0].job_id


def spec(**constraints) -> JobSpec:
    return JobSpec(
        job_id="x",
        name="big-1",
        model="mlp",
        mode="classify",
        hyper={},
        data={},
        seed=0,
        command=("python",),
        constraints=Constraints(**constraints),
    )


# -- a valid manifest -----------------------------------------------------------


def test_valid_manifest_resolves_models_hosts_settings_and_jobs(tmp_path):
    manifest = load(tmp_path, MLP_JOB)

    assert manifest.path == str(tmp_path / "fleet.toml")
    assert manifest.schema_version == 1
    assert manifest.settings.prefer_cuda_grace_s == 300.0
    assert manifest.settings.max_attempts == 3
    assert manifest.models["mlp"].command == ("{python}", "-m", "trainfleet.examples.torch_mlp")
    assert manifest.models["mlp"].requires == ("torch",)
    assert manifest.models["sk"].hyper["depth"].has_default is False
    pi = manifest.hosts["pi-1"]
    assert (pi.allow_jobs, pi.deny_jobs, pi.max_cores, pi.cpu_slots, pi.gpu_slots, pi.serve_cpu) == (
        ("sk*",),
        ("*big*",),
        2.0,
        1,
        0,
        True,
    )
    assert pi.max_vram_gib is None
    (job,) = manifest.jobs
    assert job.command == manifest.models["mlp"].command
    assert job.requires == ("torch",)
    assert job.seed == 1 and job.priority == 0
    assert job.constraints == Constraints()
    assert manifest.job_by_id(job.job_id) is job
    assert manifest.job_by_id("nope") is None


def test_omitted_hyper_params_take_their_defaults(tmp_path):
    (job,) = load(tmp_path, MLP_JOB).jobs
    assert job.hyper == {"act": "relu", "bias": True, "epochs": 5, "lr": 0.01}


def test_float_hyper_value_given_as_int_is_normalised_to_float(tmp_path):
    (job,) = load(tmp_path, MLP_JOB + "hyper = { lr = 1 }\n").jobs
    assert job.hyper["lr"] == 1.0 and isinstance(job.hyper["lr"], float)


def test_job_data_is_merged_over_model_data_defaults(tmp_path):
    (job,) = load(tmp_path, MLP_JOB + "data = { split = 0.5, noise = true }\n").jobs
    assert job.data == {"dataset": "digits", "split": 0.5, "noise": True}


def test_job_constraints_resolve_with_tuples_for_host_lists(tmp_path):
    jobs = (
        MLP_JOB
        + """require_cuda = true
min_vram_gib = 10
min_ram_gib = 2
min_cores = 1.5
allowed_hosts = ["gpu-a", "gpu-b", "gpu-a"]
denied_hosts = ["pi-1"]
"""
    )
    (job,) = load(tmp_path, jobs).jobs
    assert job.constraints == Constraints(
        require_cuda=True,
        min_vram_gib=10.0,
        min_ram_gib=2.0,
        min_cores=1.5,
        allowed_hosts=("gpu-a", "gpu-b"),
        denied_hosts=("pi-1",),
    )


def test_parse_manifest_names_string_source_in_problems():
    with pytest.raises(ManifestError) as info:
        parse_manifest("schema_version = 2\n")
    assert str(info.value).startswith("<string>: field 'schema_version'")


def test_to_json_lists_jobs_with_their_ticket_class(tmp_path):
    jobs = MLP_JOB + 'allowed_hosts = ["gpu-a"]\n'
    manifest = load(tmp_path, jobs)
    out = json.loads(json.dumps(manifest.to_json()))
    assert out["file"] == str(tmp_path / "fleet.toml")
    (job,) = out["jobs"]
    assert job["job_id"] == manifest.jobs[0].job_id
    assert (job["name"], job["model"], job["mode"], job["seed"], job["priority"]) == (
        "mlp-classify-s1",
        "mlp",
        "classify",
        1,
        0,
    )
    assert job["hyper"]["epochs"] == 5
    assert job["klass"] == "host.gpu-a"


# -- job errors -----------------------------------------------------------------


def test_undeclared_model_is_an_error(tmp_path):
    err, path = load_error(tmp_path, '[[jobs]]\nname = "j1"\nmodel = "gpt"\nmode = "fit"\n')
    p = problem(err, path, "j1", "model")
    assert "'gpt' is not declared" in p.message and "mlp, sk" in p.message


def test_undeclared_mode_is_an_error(tmp_path):
    err, path = load_error(tmp_path, '[[jobs]]\nname = "j1"\nmodel = "mlp"\nmode = "regress"\n')
    p = problem(err, path, "j1", "mode")
    assert "'regress' is not a mode of model 'mlp'" in p.message


def test_unknown_hyper_key_is_an_error(tmp_path):
    err, path = load_error(tmp_path, MLP_JOB + "hyper = { epoch = 3 }\n")
    p = problem(err, path, "mlp-classify-s1", "hyper.epoch")
    assert "unknown hyper parameter 'epoch'" in p.message


@pytest.mark.parametrize(
    ("hyper", "key", "expected"),
    [
        ('epochs = "3"', "epochs", "must be an integer, got string"),
        ("epochs = true", "epochs", "must be an integer, got boolean true"),
        ("epochs = 3.0", "epochs", "must be an integer, got float"),
        ('lr = "fast"', "lr", "must be a finite number"),
        ("lr = false", "lr", "must be a finite number"),
        ("lr = nan", "lr", "must be a finite number"),
        ("act = 1", "act", "must be a string"),
        ("bias = 1", "bias", "must be true or false, got integer 1"),
    ],
)
def test_wrong_hyper_type_is_an_error(tmp_path, hyper, key, expected):
    err, path = load_error(tmp_path, MLP_JOB + f"hyper = {{ {hyper} }}\n")
    assert expected in problem(err, path, "mlp-classify-s1", f"hyper.{key}").message


@pytest.mark.parametrize(
    ("hyper", "key", "expected"),
    [
        ('act = "gelu"', "act", 'is not one of the choices ["relu", "tanh"]'),
        ("epochs = 0", "epochs", "0 is below min 1"),
        ("epochs = 101", "epochs", "101 is above max 100"),
        ("lr = 1.5", "lr", "1.5 is above max 1.0"),
    ],
)
def test_hyper_choices_min_and_max_are_enforced(tmp_path, hyper, key, expected):
    err, path = load_error(tmp_path, MLP_JOB + f"hyper = {{ {hyper} }}\n")
    assert expected in problem(err, path, "mlp-classify-s1", f"hyper.{key}").message


@pytest.mark.parametrize("missing", ["name", "model", "mode"])
def test_missing_required_job_field_is_an_error(tmp_path, missing):
    fields = {"name": '"j1"', "model": '"mlp"', "mode": '"classify"'}
    del fields[missing]
    body = "".join(f"{key} = {value}\n" for key, value in fields.items())
    err, path = load_error(tmp_path, "[[jobs]]\n" + body)
    # A job without a name is named by its 1-based position.
    label = "#1" if missing == "name" else "j1"
    assert f"required key {missing!r} is missing" in problem(err, path, label, missing).message


def test_required_hyper_param_without_default_must_be_given(tmp_path):
    err, path = load_error(tmp_path, '[[jobs]]\nname = "tree"\nmodel = "sk"\nmode = "fit"\n')
    p = problem(err, path, "tree", "hyper.depth")
    assert "required hyper parameter 'depth' of model 'sk' is missing" in p.message


def test_jobs_with_the_same_content_are_an_error_naming_both(tmp_path):
    jobs = MLP_JOB + MLP_JOB.replace("mlp-classify-s1", "again")
    err, path = load_error(tmp_path, jobs)
    p = problem(err, path, "again", None)
    assert "'again' has the same content as job 'mlp-classify-s1'" in p.message
    assert len(err.problems) == 1


def test_two_jobs_with_the_same_name_are_an_error(tmp_path):
    jobs = MLP_JOB + MLP_JOB.replace("seed = 1", "seed = 2")
    err, path = load_error(tmp_path, jobs)
    p = problem(err, path, "mlp-classify-s1", "name")
    assert "used by more than one job (#1, #2)" in p.message


def test_job_with_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    err, path = load_error(tmp_path, MLP_JOB + "min_ram_gb = 4\n")
    p = problem(err, path, "mlp-classify-s1", "min_ram_gb")
    assert "unknown key 'min_ram_gb' (did you mean 'min_ram_gib'?)" in p.message


def test_bad_host_token_in_allowed_hosts_is_an_error(tmp_path):
    err, path = load_error(tmp_path, MLP_JOB + 'allowed_hosts = ["gpu-a", "pi 1"]\n')
    p = problem(err, path, "mlp-classify-s1", "allowed_hosts")
    assert "must be a host id" in p.message and '"pi 1"' in p.message and "gpu-a" not in p.message


def test_host_both_allowed_and_denied_is_an_error(tmp_path):
    err, path = load_error(tmp_path, MLP_JOB + 'allowed_hosts = ["a"]\ndenied_hosts = ["a"]\n')
    p = problem(err, path, "mlp-classify-s1", "denied_hosts")
    assert "in both allowed_hosts and denied_hosts" in p.message


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("min_ram_gib = -1", "min_ram_gib", "must be a number >= 0, got integer -1"),
        ("min_vram_gib = true", "min_vram_gib", "must be a number >= 0, got boolean true"),
        ("min_cores = inf", "min_cores", "must be a number >= 0"),
        ("seed = 1.5", "seed", "must be an integer"),
        ('priority = "high"', "priority", "must be an integer"),
        ('require_cuda = "yes"', "require_cuda", "must be true or false"),
        ("data = { when = 2024-01-01 }", "data", "dates and times are not supported"),
    ],
)
def test_bad_job_field_values_are_errors(tmp_path, line, field, expected):
    err, path = load_error(tmp_path, MLP_JOB.replace("seed = 1\n", "") + line + "\n")
    assert expected in problem(err, path, "mlp-classify-s1", field).message


def test_jobs_entry_that_is_not_a_table_is_named_by_index(tmp_path):
    err, path = load_error(tmp_path, "", base=BASE.replace("[settings]", "jobs = [1]\n[settings]"))
    assert "must be a table" in problem(err, path, "#1", None).message


# -- top-level, settings, model and host errors ------------------------------------


@pytest.mark.parametrize(
    ("edit", "job", "field"),
    [
        (("schema_version = 1", "schema_version = 1\nversion = 2"), None, "version"),
        (("max_attempts = 3", "max_attempts = 3\nretries = 1"), None, "settings.retries"),
        (('requires = ["torch"]', 'requires = ["torch"]\ncmd = "x"'), None, "models.mlp.cmd"),
        (("default = 5", "default = 5\nstep = 1"), None, "models.mlp.hyper.epochs.step"),
        (("serve_cpu = true", "serve_cpu = true\nmax_gpus = 1"), None, "hosts.pi-1.max_gpus"),
    ],
)
def test_unknown_keys_are_errors_everywhere(tmp_path, edit, job, field):
    err, path = load_error(tmp_path, MLP_JOB, base=BASE.replace(*edit))
    assert "unknown key" in problem(err, path, job, field).message
    assert len(err.problems) == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", "required key 'schema_version' is missing"),
        ("schema_version = 2", "unsupported schema_version integer 2"),
        ("schema_version = true", "unsupported schema_version boolean true"),
    ],
)
def test_schema_version_must_be_1(tmp_path, line, expected):
    err, path = load_error(tmp_path, MLP_JOB, base=BASE.replace("schema_version = 1", line))
    assert expected in problem(err, path, None, "schema_version").message


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    err, path = load_error(tmp_path, "[[jobs]]\nname = \n")
    (p,) = err.problems
    assert p.file == str(path)
    assert "TOML syntax error" in p.message
    assert f"line {BASE.count(chr(10)) + 2}, column" in p.message


def test_missing_file_is_a_manifest_error_naming_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: manifest file not found"


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        (("default = 5", 'default = "5"'), "models.mlp.hyper.epochs.default", "must be an integer"),
        (("default = 5", "default = 500"), "models.mlp.hyper.epochs.default", "500 is above max 100"),
        (('default = "relu"', 'default = "gelu"'), "models.mlp.hyper.act.default", "not one of the choices"),
        (
            ('choices = ["relu", "tanh"]', 'choices = ["relu", 2]'),
            "models.mlp.hyper.act.choices",
            "every choice must be of type str",
        ),
        (("max = 100", "max = 0"), "models.mlp.hyper.epochs.max", "max 0 is below min 1"),
        (('type = "str"', 'type = "str"\nmin = 1'), "models.mlp.hyper.act.min", "only applies to int"),
        (('type = "bool"', 'type = "boolean"'), "models.mlp.hyper.bias.type", "must be one of int, float"),
        (('modes = ["classify", "autoencode"]', "modes = []"), "models.mlp.modes", "non-empty array"),
        (
            ('command = ["{python}", "-m", "trainfleet.examples.sk_tree"]', ""),
            "models.sk.command",
            "required key 'command'",
        ),
        (('requires = ["torch"]', 'requires = ["torch-vision"]'), "models.mlp.requires", "module name"),
        (("max_cores = 2.0", "max_cores = -2.0"), "hosts.pi-1.max_cores", "must be a number >= 0"),
        (("cpu_slots = 1", "cpu_slots = 1.5"), "hosts.pi-1.cpu_slots", "must be an integer >= 0"),
        (("serve_cpu = true", 'serve_cpu = "no"'), "hosts.pi-1.serve_cpu", "must be true or false"),
        (("[hosts.pi-1]", '[hosts."pi..1"]'), "hosts.pi..1", "host id 'pi..1' must be a hostname"),
        (("[hosts.pi-1]", '[hosts."pi 1"]'), "hosts.pi 1", "host id 'pi 1' must be a hostname"),
        (("[hosts.pi-1]", "[hosts.pi.lan]"), "hosts.pi.lan", '[hosts."pi.lan"], not [hosts.pi.lan]'),
        (("max_attempts = 3", "max_attempts = 0"), "settings.max_attempts", "must be an integer >= 1"),
        (
            ("prefer_cuda_grace_s = 300.0", "prefer_cuda_grace_s = -1"),
            "settings.prefer_cuda_grace_s",
            "must be a number >= 0",
        ),
    ],
)
def test_model_host_and_settings_errors_name_their_field(tmp_path, edit, field, expected):
    base = BASE.replace(*edit)
    assert base != BASE
    err, path = load_error(tmp_path, MLP_JOB, base=base)
    assert expected in problem(err, path, None, field).message


def test_broken_hyper_param_is_reported_once_not_again_per_job(tmp_path):
    base = BASE.replace("default = 5", 'default = "5"')
    err, _ = load_error(tmp_path, MLP_JOB + "hyper = { epochs = 3 }\n", base=base)
    assert [p.field for p in err.problems] == ["models.mlp.hyper.epochs.default"]


def test_all_problems_are_reported_together(tmp_path):
    base = BASE.replace("schema_version = 1", "schema_version = 7")
    base = base.replace("max_cores = 2.0", "max_cores = -1")
    jobs = """
[[jobs]]
name = "a"
model = "gpt"
mode = "fit"

[[jobs]]
model = "mlp"
mode = "classify"
hyper = { epochs = true, lr = "x" }
min_ram_gib = -4
colour = "red"
"""
    err, path = load_error(tmp_path, jobs, base=base)
    got = {(p.job, p.field) for p in err.problems}
    assert got == {
        (None, "schema_version"),
        (None, "hosts.pi-1.max_cores"),
        ("a", "model"),
        ("#2", "colour"),
        ("#2", "name"),
        ("#2", "hyper.epochs"),
        ("#2", "hyper.lr"),
        ("#2", "min_ram_gib"),
    }
    assert len(str(err).splitlines()) == len(err.problems) == 8
    assert all(p.file == str(path) for p in err.problems)


# -- job ids --------------------------------------------------------------------


def test_job_id_is_sha256_of_canonical_identity_json(tmp_path):
    (job,) = load(tmp_path, MLP_JOB).jobs
    canonical = json.dumps(job.identity(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert job.job_id == hashlib.sha256(canonical.encode()).hexdigest()
    assert job_id_for(job.identity()) == job.job_id


def test_job_id_is_stable_across_loads(tmp_path):
    assert job_id(tmp_path, MLP_JOB) == job_id(tmp_path, MLP_JOB, "other.toml")


def test_job_id_ignores_key_order_in_the_toml(tmp_path):
    one = MLP_JOB + 'hyper = { epochs = 3, act = "tanh" }\ndata = { a = 1, b = 2 }\n'
    two = """
[[jobs]]
data = { b = 2, a = 1 }
hyper = { act = "tanh", epochs = 3 }
seed = 1
mode = "classify"
model = "mlp"
name = "mlp-classify-s1"
"""
    assert job_id(tmp_path, one, "one.toml") == job_id(tmp_path, two, "two.toml")


def test_job_id_is_the_same_for_explicit_default_and_omitted(tmp_path):
    explicit = MLP_JOB + 'hyper = { epochs = 5, act = "relu" }\ndata = { dataset = "digits" }\n'
    assert job_id(tmp_path, MLP_JOB, "a.toml") == job_id(tmp_path, explicit, "b.toml")


def test_job_id_is_the_same_for_int_and_float_spelling_of_a_float_param(tmp_path):
    as_int = job_id(tmp_path, MLP_JOB + "hyper = { lr = 1 }\n", "a.toml")
    assert as_int == job_id(tmp_path, MLP_JOB + "hyper = { lr = 1.0 }\n", "b.toml")


@pytest.mark.parametrize(
    "edit", [('name = "mlp-classify-s1"', 'name = "renamed"'), ("seed = 1", "seed = 1\npriority = 9")]
)
def test_editing_name_or_priority_keeps_the_job_id(tmp_path, edit):
    assert job_id(tmp_path, MLP_JOB, "a.toml") == job_id(tmp_path, MLP_JOB.replace(*edit), "b.toml")


@pytest.mark.parametrize(
    "edit",
    [
        ("seed = 1", "seed = 2"),
        ("seed = 1", "seed = 1\nhyper = { epochs = 6 }"),
        ('mode = "classify"', 'mode = "autoencode"'),
        ("seed = 1", 'seed = 1\nallowed_hosts = ["gpu-a"]'),
        ("seed = 1", 'seed = 1\ndata = { dataset = "iris" }'),
    ],
)
def test_changing_seed_hyper_mode_hosts_or_data_changes_the_job_id(tmp_path, edit):
    assert job_id(tmp_path, MLP_JOB, "a.toml") != job_id(tmp_path, MLP_JOB.replace(*edit), "b.toml")


def test_allowed_hosts_order_does_not_change_the_job_id(tmp_path):
    one = job_id(tmp_path, MLP_JOB + 'allowed_hosts = ["a", "b"]\n', "a.toml")
    assert one == job_id(tmp_path, MLP_JOB + 'allowed_hosts = ["b", "a"]\n', "b.toml")


# -- ticket classes and host policy --------------------------------------------------


@pytest.mark.parametrize(
    ("constraints", "klass"),
    [
        ({}, "cpu"),
        ({"min_vram_gib": 10.0}, "cpu"),
        ({"require_cuda": True}, "gpu.0"),
        ({"require_cuda": True, "min_vram_gib": 10.0}, "gpu.12"),
        ({"prefer_cuda": True, "min_vram_gib": 16.0}, "gpu.16"),
        ({"require_cuda": True, "min_vram_gib": 500.0}, "gpu.192"),
        ({"require_cuda": True, "allowed_hosts": ("box-1",)}, "host.box-1"),
        ({"require_cuda": True, "min_vram_gib": 4.0, "allowed_hosts": ("a", "b")}, "gpu.4"),
    ],
)
def test_ticket_class(constraints, klass):
    assert ticket_class(spec(**constraints)) == klass


@pytest.mark.parametrize(
    ("allow", "deny", "names", "name", "model", "permitted"),
    [
        ((), (), ((), ()), "big-1", "mlp", True),
        (("sk*",), (), ((), ()), "tree", "sk", True),
        # allow_jobs / deny_jobs match models only (as the predecessor's did), never job names
        (("sk*",), (), ((), ()), "sk-tree", "mlp", False),
        (("gbm",), (), ((), ()), "gbm", "mlp", False),
        ((), ("gbm",), ((), ()), "gbm", "mlp", True),
        ((), ("*big*",), ((), ()), "big-1", "mlp", True),
        ((), ("ml*",), ((), ()), "big-1", "mlp", False),
        (("mlp",), ("mlp",), ((), ()), "big-1", "mlp", False),
        # job-name patterns have their own keys
        ((), (), (("sk*",), ()), "sk-tree", "mlp", True),
        ((), (), (("sk*",), ()), "tree", "sk", False),
        ((), (), ((), ("*big*",)), "big-1", "mlp", False),
        (("mlp",), (), ((), ("big-*",)), "big-1", "mlp", False),
        (("mlp",), (), ((), ("big-*",)), "small-1", "mlp", True),
        (("mlp",), (), (("small-*",), ()), "small-1", "gbm", False),
        (("*",), (), (("*big*",), ("*big*",)), "big-1", "mlp", False),
    ],
)
def test_host_policy_permits_allow_and_deny_with_deny_winning(allow, deny, names, name, model, permitted):
    policy = HostPolicy("pi-1", allow_jobs=allow, deny_jobs=deny, allow_job_names=names[0], deny_job_names=names[1])
    job = JobSpec(job_id="x", name=name, model=model, mode="m", hyper={}, data={}, seed=0, command=("p",))
    ok, reason = policy.permits(job)
    assert ok is permitted
    assert (reason == "") is permitted
    if not ok:
        assert reason.startswith("host policy of pi-1: ")


def test_host_policy_reasons_name_the_rule_and_the_pattern():
    job = JobSpec(job_id="x", name="gbm", model="mlp", mode="m", hyper={}, data={}, seed=0, command=("p",))
    assert HostPolicy("pi-1", deny_jobs=("ml*",)).permits(job) == (
        False,
        "host policy of pi-1: deny_jobs pattern 'ml*' matches model 'mlp'",
    )
    assert HostPolicy("pi-1", deny_job_names=("g*",)).permits(job) == (
        False,
        "host policy of pi-1: deny_job_names pattern 'g*' matches job 'gbm'",
    )
    assert HostPolicy("pi-1", allow_jobs=("gbm",)).permits(job) == (
        False,
        "host policy of pi-1: allow_jobs [\"gbm\"] does not match model 'mlp'",
    )
    assert HostPolicy("pi-1", allow_job_names=("x*",)).permits(job) == (
        False,
        "host policy of pi-1: allow_job_names [\"x*\"] does not match job 'gbm'",
    )


def test_host_policy_job_name_keys_load_and_are_checked(tmp_path):
    hosts = '[hosts.pi-1]\nallow_job_names = ["a*"]\ndeny_job_names = ["*-big"]\n[hosts.pi-2]\nallow_job_names = "a*"\n'
    with pytest.raises(ManifestError) as err:
        parse_manifest("schema_version = 1\n" + hosts)
    assert [p.field for p in err.value.problems] == ["hosts.pi-2.allow_job_names"]
    manifest = parse_manifest("schema_version = 1\n" + hosts.split("[hosts.pi-2]")[0])
    assert (manifest.hosts["pi-1"].allow_job_names, manifest.hosts["pi-1"].deny_job_names) == (("a*",), ("*-big",))


# -- the parser -------------------------------------------------------------------

VARIED_JOBS = """
[[jobs]]
name = "mlp-varied"
model = "mlp"
mode = "autoencode"
seed = -3
hyper = { lr = 1, act = "tanh", bias = false, epochs = 7 }
data = { dataset = "digits", split = 0.25, note = "naïve \\u00e9 \\"quoted\\"" }
allowed_hosts = ["pi-1", "ws-2"]
min_ram_gib = 1.5
priority = 4

[[jobs]]
name = "sk-deep"
model = "sk"
mode = "fit"
hyper.depth = 12
denied_hosts = ["pi-1"]
require_cuda = true
"""


def test_the_manifest_is_read_by_the_compiled_tomli():
    # The installed dependency, not the fallback: a 100k-job manifest parses 2.2x faster.
    from trainfleet.controller import manifest

    assert manifest.tomllib.__name__ == "tomli"
    assert manifest.tomllib.__file__.endswith(".so"), manifest.tomllib.__file__


def test_tomli_and_the_standard_tomllib_give_the_same_manifest_and_errors(tmp_path, monkeypatch):
    import tomllib as stdlib

    from trainfleet.controller import manifest

    text = BASE + MLP_JOB + VARIED_JOBS
    bad = BASE + MLP_JOB + '\n[[jobs]]\nname = "x\nmodel = "mlp"\n'
    with pytest.raises(ManifestError) as fast_error:
        parse_manifest(bad, file="bad.toml")
    fast = parse_manifest(text, file="fleet.toml")
    monkeypatch.setattr(manifest, "tomllib", stdlib)
    with pytest.raises(ManifestError) as std_error:
        parse_manifest(bad, file="bad.toml")
    assert parse_manifest(text, file="fleet.toml") == fast
    assert str(fast_error.value) == str(std_error.value)
    assert "line" in str(fast_error.value) and "column" in str(fast_error.value)
    ids = {j.name: j.job_id for j in fast.jobs}
    for job in fast.jobs:
        canonical = json.dumps(job.identity(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert ids[job.name] == hashlib.sha256(canonical.encode()).hexdigest()
    assert fast.jobs[1].constraints == Constraints(allowed_hosts=("pi-1", "ws-2"), min_ram_gib=1.5)
    assert fast.jobs[0].constraints == Constraints()


@pytest.mark.parametrize("enabled", [True, False])
def test_parsing_leaves_the_cycle_collector_as_it_found_it(enabled):
    import gc

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        parse_manifest(BASE + MLP_JOB, file="fleet.toml")
        assert gc.isenabled() is enabled
        with pytest.raises(ManifestError):
            parse_manifest(BASE + MLP_JOB + "\n[[jobs]]\nname = 3\n", file="fleet.toml")
        assert gc.isenabled() is enabled
        with pytest.raises(ManifestError):
            parse_manifest("this is = = not toml", file="fleet.toml")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
