"""Label efficiency with frozen features (the demo's "does MAE pretraining help" experiment):
subject-grouped, stratified, nested subsets shared by every arm; an informative feature set
beats noise at every fraction and the generated sentence says so, noise against noise says
"no difference detected"; the curve is drawn; bad inputs name their argument; features of the
mae / random_init / pixels arms from a tiny MAE checkpoint."""
import json

import numpy as np
import pytest

from usfmae_fast.finetune import (extract_features, label_subsets, measure_label_efficiency,
                                  plot_label_efficiency, read_labels)

from _finetune_data import make_labelled_set, tiny_mae_checkpoint

K = 3


def synthetic(seed=0, subjects=(10, 5), images=(3, 2), dim=6):
    """Dev / test labels, subject ids and three feature sets: ``mae`` informative (class mean
    shift plus a subject effect), ``random_init`` and ``pixels`` pure noise."""
    rng = np.random.default_rng(seed)

    def part(n_subjects, per_subject, prefix):
        y = np.repeat(np.arange(K), n_subjects * per_subject)
        groups = np.array([f"{prefix}{c}-{i // per_subject}" for c in range(K)
                           for i in range(n_subjects * per_subject)])
        return y, groups

    (y_dev, g_dev), (y_test, g_test) = part(subjects[0], images[0], "d"), part(subjects[1],
                                                                               images[1], "t")
    n = len(y_dev) + len(y_test)
    y = np.concatenate([y_dev, y_test])
    subject = np.unique(np.concatenate([g_dev, g_test]), return_inverse=True)[1]
    shift = 1.5 * np.eye(K, dim)[y] + 0.5 * rng.normal(size=(subject.max() + 1, dim))[subject]
    features = {"mae": shift + rng.normal(size=(n, dim)),
                "random_init": rng.normal(size=(n, dim)),
                "pixels": rng.normal(size=(n, 2 * dim))}
    return features, y_dev, g_dev, y_test, g_test


CLASSES = ["normal", "cyst", "solid"]
COMPARISONS = [("mae", "random_init"), ("mae", "pixels"), ("random_init", "pixels")]


@pytest.fixture(scope="module")
def result():
    features, y_dev, g_dev, y_test, g_test = synthetic()
    return measure_label_efficiency(features, y_dev, g_dev, y_test, g_test, CLASSES, seeds=4,
                                    n_boot=200, comparisons=COMPARISONS)


def test_informative_arm_wins_everywhere_and_noise_ties(result):
    json.dumps(result)  # plain numbers only
    assert result["nested"] and result["fractions"] == [0.1, 0.25, 0.5, 1.0]
    for i, fraction in enumerate(result["fractions"]):
        mae = result["results"]["mae"][i]
        for other in ("random_init", "pixels"):
            assert mae["mean"] > result["results"][other][i]["mean"] + 0.2, (fraction, other)
    rows = {(d["a"], d["b"], d["fraction"]): d for d in result["differences"]}
    for fraction in result["fractions"]:
        for other, label in (("random_init", "random-init features"), ("pixels", "raw pixels")):
            sentence = rows["mae", other, fraction]["sentence"]
            assert sentence.startswith(f"`mae` has a higher test AUC than `{other}`")
            assert sentence.endswith("excludes zero.")
        noise = rows["random_init", "pixels", fraction]
        assert noise["sentence"].startswith("No difference in test AUC detected between "
                                            "`random_init` and `pixels`"), noise
    assert result["sentences"] == [d["sentence"] for d in result["differences"]]


def test_full_set_is_one_fit_with_a_clustered_bootstrap(result):
    full = result["results"]["mae"][-1]
    assert full["n_fits"] == 1 and full["sd"] == 0.0 and full["ci"] == [full["mean"]] * 2
    assert result["training"][-1] == {"fraction": 1.0, "n_subjects": 30,
                                      "n_subjects_per_class": dict.fromkeys(CLASSES, 10),
                                      "n_images": [90], "n_fits": 1}
    assert result["training"][0]["n_subjects"] == 3 and result["training"][0]["n_fits"] == 4
    row = next(d for d in result["differences"] if d["fraction"] == 1.0)
    assert row["n_test_subjects"] == 15 and "bootstrap" in row["interval"]
    assert 0 <= row["p_value_delong"] < 0.05 and row["ci"][0] > 0
    partial = result["differences"][0]
    assert len(partial["differences"]) == 4 and "t-interval over 4 seeds" in partial["interval"]
    assert "never tuned on the test set" in result["method"]


def test_subsets_grouped_stratified_nested_and_reproducible():
    _, y_dev, g_dev, _, _ = synthetic()
    subsets = label_subsets(y_dev, g_dev, K, seeds=3, seed=7)
    assert [len(fits) for fits in subsets] == [3, 3, 3, 1]
    for fits in subsets:
        for idx in fits:
            chosen = set(g_dev[idx])
            assert set(np.flatnonzero(np.isin(g_dev, list(chosen)))) == set(idx)  # all or none
            assert set(y_dev[idx]) == set(range(K))                               # stratified
    for s in range(3):  # nested: a seed's smaller subset lies inside its larger one
        for small, large in zip(subsets[:-2], subsets[1:-1]):
            assert set(small[s]) <= set(large[s])
    again = label_subsets(y_dev, g_dev, K, seeds=3, seed=7)
    assert all(np.array_equal(a, b) for fa, fb in zip(subsets, again) for a, b in zip(fa, fb))
    other = label_subsets(y_dev, g_dev, K, seeds=3, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(subsets[1], other[1]))


def test_same_subsets_for_every_arm_and_reproducible(result):
    features, y_dev, g_dev, y_test, g_test = synthetic()
    alone = measure_label_efficiency({"pixels": features["pixels"]}, y_dev, g_dev, y_test,
                                     g_test, CLASSES, seeds=4, n_boot=200)
    assert alone["results"]["pixels"] == result["results"]["pixels"]  # other arms: no effect
    pair = {arm: (f[:len(y_dev)], f[len(y_dev):]) for arm, f in features.items()}
    assert measure_label_efficiency(pair, y_dev, g_dev, y_test, g_test, CLASSES, seeds=4,
                                    n_boot=200, comparisons=COMPARISONS) == result
    shifted = measure_label_efficiency(features, y_dev, g_dev, y_test, g_test, CLASSES,
                                       seeds=4, n_boot=200, seed=1)
    assert shifted["results"]["mae"][0]["auc"] != result["results"]["mae"][0]["auc"]


def test_curve_is_drawn(result, tmp_path):
    path = plot_label_efficiency(result, tmp_path / "fig" / "label_efficiency.png", "demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change, match", [
    (dict(fractions=(0.0, 0.5)), "fractions"), (dict(fractions=(0.5, 1.5)), "fractions"),
    (dict(groups_dev="short"), "groups_dev"), (dict(y_test="short"), "features"),
    (dict(few_subjects=True), "groups_dev"), (dict(seeds=0), "seeds"),
    (dict(leak=True), "groups_test"), (dict(comparisons=[("mae", "x")]), "comparisons")])
def test_bad_inputs_name_the_argument(change, match):
    features, y_dev, g_dev, y_test, g_test = synthetic(subjects=(2, 2))
    kwargs = dict(fractions=(0.5, 1.0), seeds=2, n_boot=10)
    if change.pop("few_subjects", False):  # two subjects for three classes
        g_dev = np.where(y_dev == 0, "dA", "dB")
    if change.pop("leak", False):
        g_test = g_test.copy()
        g_test[0] = g_dev[0]
    if change.pop("groups_dev", None):
        g_dev = g_dev[:-1]
    if change.pop("y_test", None):
        y_test, g_test = y_test[:-1], g_test[:-1]
    with pytest.raises(ValueError, match=match):
        measure_label_efficiency(features, y_dev, g_dev, y_test, g_test, CLASSES,
                         **{**kwargs, **change})


def test_extract_features_of_the_three_arms(tmp_path):
    ckpt = tiny_mae_checkpoint(tmp_path)  # the untrained MAE of torch.manual_seed(0)
    images = read_labels(make_labelled_set(tmp_path / "data", per_class=2))

    def features(arm, seed=0, **kw):
        return extract_features(ckpt, images, arm=arm, seed=seed, batch_size=4, device="cpu",
                                **kw)

    mae = features("mae")
    assert mae.shape == (6, 32) and mae.dtype == np.float32 and np.isfinite(mae).all()
    # random_init rebuilds that same architecture and init scheme: seed 0 is the checkpoint
    np.testing.assert_allclose(features("random_init", 0), mae, rtol=1e-5, atol=1e-6)
    other = features("random_init", 1)
    assert other.shape == mae.shape and np.abs(other - mae).max() > 1e-2
    np.testing.assert_array_equal(features("random_init", 1), other)
    pixels = features("pixels", pixel_side=8)
    assert pixels.shape == (6, 64)
    with pytest.raises(ValueError, match="arm"):
        features("imagenet")
    # a built encoder (size and normalisation from its pretrained_cfg) on an ImageList
    from usfmae_fast.finetune.inference import load_encoder
    np.testing.assert_array_equal(extract_features(load_encoder(ckpt)[0], images.to_image_list(),
                                                   device="cpu"), mae)
