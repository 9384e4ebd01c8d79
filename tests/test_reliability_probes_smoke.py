"""benchmarks/reliability_probes.py: the quick probes (loading, configs, recipe, sample_prior, shards, image size,
custom_pipeline=) all end in a clear error or work as documented; the ODE probes are covered by test_ode_solve.py."""
from tests._scripts import load_script

probes = load_script("benchmarks/reliability_probes.py", "psld_reliability_probes")


def test_quick_probes_are_clear_or_ok():
    rows, counts = probes.run("saved sampler|contradicting|bare|_class_name|PSLDScheduler(|RecipeSDE|sample_prior|"
                              "from_pretrained(|shard|2048|custom_pipeline")
    assert len(rows) == 54
    bad = [(name, outcome, message) for name, outcome, _, message in rows if outcome not in ("clear", "ok")]
    assert not bad, bad
    assert counts.get("ok") == 3
