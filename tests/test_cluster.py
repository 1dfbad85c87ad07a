"""Clustering engine: PCA-whitening, faiss k-means, PIC, uniform sampler, NMI (all small and fast)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from dcbench.cluster import (
    ClusterResult,
    PCAWhitening,
    UniformClusterSampler,
    cluster_sizes,
    nmi,
    preprocess_features,
    run_kmeans,
    run_pic,
)


# ----------------------------------------------------------------------------- helpers
def correlated(n: int = 2000, d: int = 32, offset: float = 100.0, seed: int = 0) -> np.ndarray:
    """Correlated float32 rows with a large common offset (exercises the centring)."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) * np.linspace(3.0, 0.1, d)[:, None]
    return (rng.standard_normal((n, d)) @ mixing + offset).astype(np.float32)


def blobs(n_blobs: int, per_blob: int, dim: int, sep: float, spread: float = 1.0,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_blobs, dim)) * sep
    labels = np.repeat(np.arange(n_blobs), per_blob)
    x = centers[labels] + spread * rng.standard_normal((labels.size, dim))
    return x.astype(np.float32), labels


def reference_whitening(x: np.ndarray, dim: int, eps: float = 1e-5) -> np.ndarray:
    """Whitened PCA of the full matrix with numpy.linalg.eigh in float64 (1/n covariance)."""
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    values, vectors = np.linalg.eigh(xc.T @ xc / len(x))
    top = np.argsort(values)[::-1][:dim]
    return xc @ vectors[:, top] / np.sqrt(values[top] + eps)


def match_signs(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return out * np.sign((out * ref).sum(axis=0))


# ----------------------------------------------------------------------------- PCA
def test_pca_whitening_identity_covariance_and_unit_rows():
    x = correlated()
    pca = PCAWhitening(dim=8).fit(x)
    raw = pca.transform(x, l2_normalize=False)
    assert raw.shape == (2000, 8) and raw.dtype == np.float32
    np.testing.assert_allclose(np.cov(raw.T, bias=True), np.eye(8), atol=1e-3)
    np.testing.assert_allclose(raw.mean(axis=0), 0.0, atol=1e-3)
    normed = pca.transform(x)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(preprocess_features(x, dim=8), normed, atol=1e-6)


def test_pca_matches_numpy_eigh_reference_up_to_sign():
    x = correlated()
    out = PCAWhitening(dim=8).fit(x).transform(x, l2_normalize=False)
    ref = reference_whitening(x, 8)
    np.testing.assert_allclose(match_signs(out, ref), ref, atol=2e-3)


def test_pca_chunked_fit_equals_unchunked():
    x = correlated(n=500, d=16)
    small = PCAWhitening(dim=6).fit(x, chunk_rows=7)
    whole = PCAWhitening(dim=6).fit(x, chunk_rows=10**6)
    np.testing.assert_allclose(small.eigenvalues_, whole.eigenvalues_, rtol=1e-4)
    np.testing.assert_allclose(small.transform(x, chunk_rows=5), whole.transform(x), atol=1e-4)


def test_pca_sample_fit_on_memmap(tmp_path):
    x = correlated(n=3000, d=24, seed=1)
    mm = np.lib.format.open_memmap(tmp_path / "feats.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.load(tmp_path / "feats.npy", mmap_mode="r")
    a = PCAWhitening(dim=6).fit(mm, sample_size=1000, seed=3, chunk_rows=128)
    b = PCAWhitening(dim=6).fit(mm, sample_size=1000, seed=3, chunk_rows=64)
    c = PCAWhitening(dim=6).fit(mm, sample_size=1000, seed=4)
    np.testing.assert_allclose(a.eigenvalues_, b.eigenvalues_, rtol=1e-4)  # same rows
    assert not np.allclose(a.eigenvalues_, c.eigenvalues_, rtol=1e-6)      # other rows
    out = a.transform(mm, chunk_rows=100, l2_normalize=False)
    # Fitted on a third of the rows: whitening of all rows is only approximate.
    np.testing.assert_allclose(np.diag(np.cov(out.T, bias=True)), 1.0, atol=0.15)
    rows = preprocess_features(mm, dim=6, sample_size=1000, seed=3)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_pca_accepts_float64_and_noncontiguous_input():
    x = correlated(n=400, d=20).astype(np.float64)
    ref = PCAWhitening(dim=5).fit(x.astype(np.float32)).transform(x.astype(np.float32))
    wide = np.repeat(x, 2, axis=1)[:, ::2]  # strided view
    np.testing.assert_allclose(PCAWhitening(dim=5).fit(wide).transform(wide), ref, atol=1e-5)
    sampled32 = PCAWhitening(dim=5).fit(x.astype(np.float32), sample_size=300, seed=1, chunk_rows=64)
    sampled64 = PCAWhitening(dim=5).fit(x, sample_size=300, seed=1, chunk_rows=64)
    np.testing.assert_allclose(sampled64.eigenvalues_, sampled32.eigenvalues_, rtol=1e-4)


@pytest.mark.parametrize("shape,dim", [((5, 32), 8), ((100, 6), 8)])
def test_pca_dim_larger_than_data_is_a_clear_error(shape, dim):
    with pytest.raises(ValueError, match="min\\(number of points, feature dimension\\)"):
        PCAWhitening(dim=dim).fit(np.ones(shape, dtype=np.float32))


def test_pca_sample_smaller_than_dim_is_an_error():
    with pytest.raises(ValueError, match="sample_size"):
        PCAWhitening(dim=8).fit(correlated(n=100, d=16), sample_size=5)


def _retrieval_reference(blocks, dim, ratio=1e-5):
    """DeepCluster's retrieval whitening as dcbench's retrieval protocol always computed it."""
    x = np.concatenate(blocks).astype(np.float64)
    mean = x.sum(axis=0) / len(x)
    values, vectors = np.linalg.eigh(x.T @ x / len(x) - np.outer(mean, mean))
    values = np.maximum(values, values.max() * ratio)
    order = np.argsort(values)[::-1][:dim]
    return mean, (vectors[:, order] / np.sqrt(values[order])).astype(np.float32), values[order].sum() / values.sum()


def test_pca_relative_floor_float64_is_the_retrieval_recipe():
    x = correlated(n=700, d=12, offset=3.0)
    x[:, -1] = x[:, 0]  # a zero eigenvalue: raised to 1e-5 of the largest, not divided by ~0
    pca = PCAWhitening(12, eps=1e-5, eps_rule="relative_floor", precision="float64").fit(
        [x[:300], x[300:]], chunk_rows=64)
    mean, projection, energy = _retrieval_reference([x[:300], x[300:]], 12)
    np.testing.assert_allclose(pca.mean_, mean, rtol=1e-12)
    np.testing.assert_allclose(match_signs(pca.projection_, projection), projection, rtol=1e-5, atol=1e-6)
    assert pca.kept_energy_ == pytest.approx(energy, rel=1e-12) and pca.eigenvalues_.min() > 0
    out = pca.transform(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    raw = pca.transform(x, l2_normalize=False)
    assert np.cov(raw[:, :11].T, bias=True) == pytest.approx(np.eye(11), abs=1e-3)


def test_pca_eps_rules_differ_only_in_the_small_eigenvalues():
    x = correlated(n=800, d=16)
    additive = PCAWhitening(4, eps=1e-5, eps_rule="additive").fit(x)
    floored = PCAWhitening(4, eps=1e-5, eps_rule="relative_floor").fit(x)
    np.testing.assert_allclose(additive.transform(x), floored.transform(x), atol=1e-4)
    with pytest.raises(ValueError, match="eps_rule"):
        PCAWhitening(4, eps_rule="clip")
    with pytest.raises(ValueError, match="precision"):
        PCAWhitening(4, precision="float16")


# ----------------------------------------------------------------------------- k-means
def test_kmeans_recovers_well_separated_blobs():
    # Random-init Lloyd (no k-means++ in the original) can stop in a local minimum that
    # merges two blobs, so use several seeds and check that the best objective is the truth:
    # this also checks that `objective` is the k-means cost.
    x, labels = blobs(n_blobs=4, per_blob=150, dim=16, sep=10.0)
    runs = [run_kmeans(x, 4, seed=s) for s in range(10)]
    best = min(runs, key=lambda r: r.objective)
    assert nmi(best.assignments, labels) > 0.99
    # Two blobs: recovered for every seed.
    x2, labels2 = blobs(n_blobs=2, per_blob=200, dim=16, sep=10.0, seed=1)
    for s in range(5):
        assert nmi(run_kmeans(x2, 2, seed=s).assignments, labels2) > 0.99


def test_kmeans_result_fields():
    x, _ = blobs(n_blobs=5, per_blob=40, dim=8, sep=5.0)
    res = run_kmeans(x, 7, n_iter=5, seed=1)
    assert isinstance(res, ClusterResult)
    assert res.assignments.dtype == np.int64 and res.assignments.shape == (200,)
    assert res.assignments.min() >= 0 and res.assignments.max() < 7
    assert res.n_clusters == 7 and math.isfinite(res.objective) and res.objective > 0
    assert res.empty_clusters == int((cluster_sizes(res.assignments, 7) == 0).sum())


def test_kmeans_same_seed_same_assignment_and_seeds_differ():
    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    first = run_kmeans(x, 20, seed=5).assignments
    np.testing.assert_array_equal(run_kmeans(x, 20, seed=5).assignments, first)
    others = [run_kmeans(x, 20, seed=s).assignments for s in range(3)]
    assert any(not np.array_equal(o, first) for o in others)


def test_kmeans_counts_empty_clusters_in_final_assignment():
    # 10 distinct points, each 10 times: 15 centroids cannot all own a point.
    x = np.repeat(np.random.default_rng(0).standard_normal((10, 4)), 10, axis=0).astype(np.float32)
    res = run_kmeans(x, 15, seed=0)
    used = np.unique(res.assignments).size
    assert used <= 10 and res.empty_clusters == 15 - used
    assert res.objective == pytest.approx(0.0, abs=1e-3)


def test_kmeans_more_clusters_than_points_is_an_error():
    with pytest.raises(ValueError, match="k=11 clusters from 10 points"):
        run_kmeans(np.zeros((10, 4), dtype=np.float32), 11)


# ----------------------------------------------------------------------------- PIC
def reference_pic(x: np.ndarray, nn: int = 5, sigma: float = 0.2, alpha: float = 0.001) -> np.ndarray:
    """Loop-based transcription of the original DeepCluster PIC (float64 v), for comparison."""
    import faiss
    import scipy.sparse as sp

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    dist, ids = index.search(x, nn + 1)
    n = len(x)
    adj = sp.csr_matrix((np.exp(-dist[:, 1:].ravel().astype(np.float64) / sigma**2),
                         ids[:, 1:].ravel(), np.arange(n + 1) * nn), shape=(n, n))
    w = (adj + adj.T).tocsr()
    v = np.ones(n) / n
    for _ in range(200):
        v = alpha * w.T.dot(v) + (1 - alpha) / n
        v /= v.sum()
    pointers = list(range(n))
    for i in range(n):
        best = 0
        for pos in range(w.indptr[i], w.indptr[i + 1]):
            j = w.indices[pos]
            score = w.data[pos] * (v[j] - v[i])
            if score > best:
                best, pointers[i] = score, j
    ids_of_root = {}
    for i in range(n):
        if pointers[i] == i:
            ids_of_root[i] = len(ids_of_root)
    clust = []
    for i in range(n):
        node = i
        while pointers[node] != node:
            node = pointers[node]
        clust.append(ids_of_root[node])
    members: dict[int, list[int]] = {c: [] for c in sorted(set(clust))}
    for i, c in enumerate(clust):
        members[c].append(i)
    moves = {}
    for c, pts in members.items():
        if len(pts) == 1:
            for nb in ids[pts[0], 1:]:
                if len(members[clust[nb]]) != 1:
                    moves[pts[0]] = nb
                    break
    clust = np.array(clust)
    for s, nb in moves.items():
        clust[s] = clust[nb]
    return clust


def test_pic_finds_blobs_without_singletons():
    # PIC follows local maxima of v, so large blobs break into several clusters: small
    # well-separated blobs (10 x 30 points) is where it is expected to recover them.
    x, labels = blobs(n_blobs=10, per_blob=30, dim=8, sep=3.0, spread=0.05, seed=0)
    res = run_pic(x)
    assert nmi(res.assignments, labels) > 0.9
    sizes = np.bincount(res.assignments)
    assert sizes.min() >= 2  # no singleton left
    assert res.n_clusters == sizes.size and set(res.assignments.tolist()) == set(range(res.n_clusters))
    assert math.isnan(res.objective) and res.empty_clusters == 0


def test_pic_matches_loop_transcription_of_original():
    x = np.random.default_rng(2).standard_normal((300, 4)).astype(np.float32) * 0.3
    ours = run_pic(x).assignments
    ref = reference_pic(x)
    assert nmi(ours, ref) == pytest.approx(1.0)
    # Same partition: a one-to-one label map.
    assert len(set(zip(ours.tolist(), ref.tolist()))) == len(set(ref.tolist())) == len(set(ours.tolist()))


def test_pic_needs_more_points_than_neighbours():
    with pytest.raises(ValueError, match="more points"):
        run_pic(np.zeros((5, 3), dtype=np.float32), n_neighbors=5)


# ----------------------------------------------------------------------------- sampler
def sampler_assignments() -> np.ndarray:
    """1000 points; clusters 0..9 of very different sizes, cluster 7 empty, 40 unreadable (-1)."""
    rng = np.random.default_rng(0)
    sizes = {0: 400, 1: 200, 2: 150, 3: 100, 4: 50, 5: 30, 6: 20, 8: 7, 9: 3}
    a = np.concatenate([np.full(s, c) for c, s in sizes.items()] + [np.full(40, -1)])
    return rng.permutation(a)


def test_sampler_length_and_only_assigned_points():
    a = sampler_assignments()
    sampler = UniformClusterSampler(a, seed=0)
    drawn = np.array(list(sampler))
    assert len(sampler) == len(drawn) == 1000
    assert (a[drawn] >= 0).all()  # -1 never drawn
    assert set(a[drawn].tolist()) == {0, 1, 2, 3, 4, 5, 6, 8, 9}  # every non-empty, no empty
    assert len(UniformClusterSampler(a, num_samples=2500)) == 2500


def test_sampler_balances_clusters():
    a = sampler_assignments()
    drawn = np.array(list(UniformClusterSampler(a, seed=1)))
    counts = np.bincount(a[drawn], minlength=10)[[0, 1, 2, 3, 4, 5, 6, 8, 9]]
    # int(1000/9)+1 = 112 per cluster, 1008 drawn, truncated to 1000 after the shuffle.
    assert counts.sum() == 1000 and counts.max() <= 112 and counts.min() >= 100
    # Large clusters are drawn without replacement.
    big = drawn[a[drawn] == 0]
    assert len(set(big.tolist())) == len(big)


def test_sampler_is_deterministic_and_epoch_reseeds():
    a = sampler_assignments()
    s1, s2 = UniformClusterSampler(a, seed=3), UniformClusterSampler(a, seed=3)
    assert list(s1) == list(s2)
    first = list(s1)
    s1.set_epoch(1)
    assert list(s1) != first
    s2.set_epoch(1)
    assert list(s1) == list(s2)
    assert list(UniformClusterSampler(a, seed=4)) != first


def test_sampler_two_ranks_cover_the_single_rank_multiset():
    a = sampler_assignments()
    single = list(UniformClusterSampler(a, num_samples=1001, seed=7))
    ranks = [list(UniformClusterSampler(a, num_samples=1001, seed=7, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 501
    assert len(UniformClusterSampler(a, num_samples=1001, rank=1, world_size=2)) == 501
    merged = Counter(ranks[0] + ranks[1])
    merged.subtract(Counter(single))
    padding = +merged  # what the shards hold beyond the single-rank list
    assert sum(padding.values()) == 1 and (-merged) == Counter()
    assert list(padding) == single[:1]  # padding repeats the head of the list


def test_sampler_rejects_all_unassigned():
    with pytest.raises(ValueError, match="nothing to sample"):
        UniformClusterSampler(np.full(10, -1))


# ----------------------------------------------------------------------------- NMI, sizes
def test_nmi_hand_computed():
    # a = [0,0,1,1], b = [0,0,0,1]. Joint p: (0,0)=1/2, (1,0)=1/4, (1,1)=1/4.
    # H(a) = ln 2 = 0.693147; H(b) = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335.
    # MI = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2 = 0.143841 - 0.101366 + 0.173287 = 0.215762.
    # NMI (arithmetic) = MI / ((H(a) + H(b)) / 2) = 0.215762 / 0.627741 = 0.343711.
    assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.343711, abs=1e-6)
    assert nmi([0, 0, 1, 1], [5, 5, 3, 3]) == pytest.approx(1.0)


def test_nmi_equals_scikit_learn_on_random_and_edge_cases():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    cases = [([0, 0, 0], [1, 1, 1]), ([0, 0, 1, 1], [7, 7, 7, 7]), ([], []), ([3], [3]),
             (list(range(6)), list(range(6))), ([0, 1, 0, 1], [0, 0, 1, 1])]  # the last: MI exactly 0
    for _ in range(300):
        n = int(rng.integers(1, 80))
        a = rng.integers(0, rng.integers(1, 9), n)
        b = a[rng.permutation(n)] if rng.random() < 0.3 else rng.integers(0, rng.integers(1, 9), n)
        cases.append((a, b))
    for a, b in cases:
        expected = normalized_mutual_info_score(a, b, average_method="arithmetic")
        assert nmi(a, b) == pytest.approx(expected, abs=1e-12), (a, b)


def test_nmi_refuses_labelings_of_different_lengths():
    with pytest.raises(ValueError, match="different lengths"):
        nmi([0, 1], [0, 1, 1])


def test_cluster_sizes():
    sizes = cluster_sizes(np.array([0, 2, 2, -1, 4]), 6)
    assert sizes.dtype == np.int64
    np.testing.assert_array_equal(sizes, [1, 0, 2, 0, 1, 0])
    with pytest.raises(ValueError):
        cluster_sizes(np.array([0, 6]), 6)


def test_gram_path_for_few_points_equals_covariance_path(monkeypatch):
    """n < D takes the n x n Gram eigenproblem; it must give the covariance path's whitening."""
    from dcbench.cluster import pca as pca_module

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 16)) @ rng.standard_normal((16, 512))
         + 0.1 * rng.standard_normal((300, 512))).astype(np.float32)
    gram = PCAWhitening(8).fit(x).transform(x)
    monkeypatch.setattr(pca_module, "_GRAM_MAX_BYTES", 0)
    cov = PCAWhitening(8).fit(x).transform(x)
    assert np.abs(gram - cov).max() < 1e-4


# ----------------------------------------------------------------------------- faiss parity
def _low_variance_wide_spectrum(n: int = 3000, d: int = 256, seed: int = 0) -> np.ndarray:
    """Features x 0.01 with eigenvalues over three decades: where an epsilon or a sample shows."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = (rng.standard_normal((n, d)) * np.logspace(0, -3, d)) @ basis.T + 0.5
    return (x * 0.01).astype(np.float32)


def test_trainer_whitening_equals_faiss_pcamatrix_with_default_settings():
    """DeepCluster's clustering.py: faiss.PCAMatrix(d, dim, eigen_power=-0.5) on every row, then L2."""
    faiss = pytest.importorskip("faiss")
    x = _low_variance_wide_spectrum()
    mat = faiss.PCAMatrix(x.shape[1], 32, -0.5)
    mat.train(x)
    ref = mat.apply(x)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ours = preprocess_features(x, dim=32)
    sims, ref_sims = ours[:600] @ ours[:600].T, ref[:600] @ ref[:600].T
    assert np.abs(sims - ref_sims).max() < 1e-3
    # what the trainer used to do (eps 1e-5, a quarter of the rows) is measurably not the same
    old = preprocess_features(x, dim=32, sample_size=750, eps=1e-5)
    assert np.abs(old[:600] @ old[:600].T - ref_sims).max() > 0.05


def test_zero_eigenvalue_component_is_dropped_not_infinite():
    """No epsilon (as faiss), but a direction the data does not span gives 0, not inf/NaN."""
    x = np.zeros((50, 6), dtype=np.float32)
    x[:, :3] = np.random.default_rng(0).standard_normal((50, 3))  # three constant columns
    pca = PCAWhitening(dim=6).fit(x)
    assert np.count_nonzero(pca.eigenvalues_ == 0) == 3
    raw = pca.transform(x, l2_normalize=False)
    assert np.isfinite(raw).all() and np.all(raw[:, 3:] == 0)
    np.testing.assert_allclose(np.cov(raw[:, :3].T, bias=True), np.eye(3), atol=1e-4)


def test_moments_of_shards_fit_the_same_pca_as_all_rows():
    """torchrun: ranks summarise their rows, rank 0 fits on the combination, equal to one fit on every row."""
    from dcbench.cluster.pca import combine_moments, scatter_moments

    x = _low_variance_wide_spectrum(n=1200, d=64)
    whole = PCAWhitening(dim=16).fit(x)
    shards = [x[:500], x[500:520], x[520:]]
    combined = PCAWhitening(dim=16).fit_moments(combine_moments([scatter_moments(s) for s in shards]))
    np.testing.assert_allclose(combined.mean_, whole.mean_, rtol=1e-6, atol=1e-9)
    a, b = whole.transform(x), combined.transform(x)
    assert np.abs(a @ a[:300].T - b @ b[:300].T).max() < 1e-3
