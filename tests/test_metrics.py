"""Metrics against hand-worked examples."""
import pytest
import torch

from dowser_cli import metrics


def test_vqa_accuracy_with_ten_annotators_by_hand():
    # 3 of 10 annotators said "two": leaving out one of those 3 leaves 2 matches (2/3), leaving out one
    # of the other 7 leaves 3 (min(3/3, 1) = 1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["two", "2", "Two.", "3", "three", "3", "3", "4", "four", "3"]
    assert metrics.vqa_accuracy("2", answers) == pytest.approx(0.9)
    # "3" appears 4 times (3, 3, 3, 3) and "three" once -> 5 matches: every subset keeps >= 4 -> 1.0
    assert metrics.vqa_accuracy("three", answers) == pytest.approx(1.0)
    # one match: leaving it out gives 0, otherwise 1/3: 9 * (1/3) / 10 = 0.3
    assert metrics.vqa_accuracy("a blue car", ["blue car"] + ["red"] * 9) == pytest.approx(0.3)
    assert metrics.vqa_accuracy("dog", answers) == 0.0


def test_vqa_normalisation():
    assert metrics.normalize_vqa("The Dog.") == "dog"
    assert metrics.normalize_vqa("3.5") == "3.5"
    assert metrics.normalize_vqa("Ten") == "10"
    assert metrics.normalize_vqa("dont") == "don't"
    assert metrics.normalize_vqa("1,000") == "1000"
    assert metrics.normalize_vqa("yes, it is") == "yes it is"


def test_exact_and_contained_match():
    assert metrics.exact_match("Paris.", ["paris"]) == 1.0
    assert metrics.exact_match("It is Paris", ["paris"]) == 0.0
    assert metrics.contains_match("The capital of France is Paris.", ["Paris"]) == 1.0
    assert metrics.contains_match("Parisian food", ["Paris"]) == 0.0      # whole words only
    assert metrics.contains_match("A week has 7 days.", ["seven"]) == 1.0   # number words normalised


@pytest.mark.parametrize("text,want", [
    ("B", 1), ("(C)", 2), ("A. cat", 0), ("The answer is D.", 3), ("answer: b", 1),
    ("I think it is a black dog", 2), ("It's the dog", 3), ("Probably C, the black dog", 2),
    ("none of them", None), ("E", None),
])
def test_multiple_choice_parsing(text, want):
    options = ["cat", "bird", "black dog", "dog"]
    assert metrics.parse_choice(text, options) == want


def test_answer_index_letter_or_text():
    assert metrics.answer_index("C", ["x", "y", "z"]) == 2
    assert metrics.answer_index("Y", ["x", "y", "z"]) == 1       # a letter first when it is one
    assert metrics.answer_index("z", ["x", "y", "z"]) == 2
    with pytest.raises(ValueError):
        metrics.answer_index("w", ["x", "y", "z"])


def test_cider_d_by_hand():
    """Two images whose captions share no n-gram: every n-gram has document frequency 1 of N = 2,
    idf = log 2. A candidate equal to its reference has cosine 1 for n = 1, 2 (the 2-word captions have
    no 3- or 4-grams: 0), no length penalty: CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5."""
    score, per = metrics.cider_d({"1": "a b", "2": "c d"}, {"1": ["a b"], "2": ["c d"]})
    assert score == pytest.approx(5.0) and per == {"1": pytest.approx(5.0), "2": pytest.approx(5.0)}
    # punctuation and case do not matter (tokenised first); an unrelated caption scores 0
    score, per = metrics.cider_d({"1": "A B.", "2": "x y"}, {"1": ["a b"], "2": ["c d"]})
    assert per["1"] == pytest.approx(5.0) and per["2"] == 0.0


def test_h_score():
    assert metrics.h_score(50, 50) == 50
    assert metrics.h_score(80, 20) == pytest.approx(32.0)       # 2 * 80 * 20 / 100
    assert metrics.h_score(0, 0) == 0.0


def test_bootstrap_intervals_against_a_brute_force_loop():
    import torch

    g = torch.Generator().manual_seed(1)
    items = {"d": (torch.rand(2, 30, generator=g) > 0.5).double() * 100,
             "u1": (torch.rand(2, 40, generator=g) > 0.3).double() * 100,
             "u2": torch.rand(2, 25, generator=g) * 100}
    got = metrics.bootstrap_report(items, ["d"], ["u1", "u2"], replicates=200, seed=5)
    # the same draws by hand: per task its own seeded indices, shared by both models
    idx = {n: metrics.bootstrap_indices(x.shape[1], 200, 5 + 7919 * k) for k, (n, x) in enumerate(items.items())}
    reps = {m: {"D": [], "U": [], "H": [], "dU": []} for m in range(2)}
    for r in range(200):
        u_base = None
        for m in range(2):
            mean = {n: sum(float(items[n][m, int(i)]) for i in idx[n][r]) / items[n].shape[1] for n in items}
            d, u = mean["d"], (mean["u1"] + mean["u2"]) / 2
            u_base = u if m == 0 else u_base
            reps[m]["D"].append(d)
            reps[m]["U"].append(u)
            reps[m]["H"].append(2 * u * d / (u + d) if u + d else 0.0)
            reps[m]["dU"].append(u - u_base)
    for m in range(2):
        for key in ("D", "U", "H", "dU"):
            v = torch.tensor(reps[m][key], dtype=torch.float64)
            want = (float(torch.quantile(v, 0.025)), float(torch.quantile(v, 0.975)))
            assert got[m][key] == pytest.approx(want, abs=1e-9), (m, key)
    assert got[0]["dU"] == (0.0, 0.0)                        # the base against itself, paired
    point_u = float((items["u1"][1].mean() + items["u2"][1].mean()) / 2)
    assert got[1]["U"][0] < point_u < got[1]["U"][1]


def test_paired_interval_is_narrower_than_unpaired_for_correlated_models():
    import torch

    g = torch.Generator().manual_seed(0)
    base = (torch.rand(300, generator=g) > 0.4).double()
    run = base.clone()
    run[:15] = 0.0                                            # the run forgets 15 of the base's items
    items = {"d": torch.stack([base, run]) * 100, "u": torch.stack([base, run]) * 100}
    ci = metrics.bootstrap_report(items, ["d"], ["u"], replicates=500, seed=0)
    lo, hi = ci[1]["dU"]
    width_unpaired = (ci[1]["U"][1] - ci[1]["U"][0]) + (ci[0]["U"][1] - ci[0]["U"][0])
    assert hi < 0 and (hi - lo) < 0.5 * width_unpaired


def test_ratio_interval_resamples_whole_sequences():
    import torch

    num = torch.tensor([1.0, 2.0, 3.0, 10.0])
    den = torch.tensor([1, 1, 1, 2])
    lo, hi = metrics.ratio_interval(num, den, replicates=400, seed=0)
    assert lo <= 16 / 5 <= hi and 1.0 <= lo and hi <= 5.0


def test_paired_bootstrap_against_a_brute_force_loop():
    """Three models, a downstream and two upstream tasks: the paired interval of model 1 minus model 2
    (and of the mean over the pairs (1, 2) and (0, 2)) equals a replicate-by-replicate loop over the same
    item draws; the unpaired intervals are wider than the paired one for correlated models."""
    g = torch.Generator().manual_seed(3)
    base = (torch.rand(30, generator=g) < 0.6).double()
    items = {"down": (torch.rand(3, 20, generator=g) < 0.5).double(),
             "up1": torch.stack([base, base.clone(), base.clone()]),
             "up2": (torch.rand(1, 25, generator=g) < 0.7).double().repeat(3, 1)}
    items["up1"][1, :4] = 1 - items["up1"][1, :4]       # upstream, model 1 differs from model 2 on 4 items only
    items["up2"][0, :3] = 1 - items["up2"][0, :3]
    R, seed = 200, 5
    reps = metrics.bootstrap_replicates(items, ["down"], ["up1", "up2"], R, seed)
    draws = {name: metrics.bootstrap_indices(x.shape[1], R, seed + 7919 * k) for k, (name, x) in enumerate(items.items())}

    def stat(m, r, key):
        mean = {n: float(items[n][m][draws[n][r]].mean()) for n in items}
        d, u = mean["down"], (mean["up1"] + mean["up2"]) / 2
        return {"D": d, "U": u, "H": 2 * u * d / (u + d) if u + d else 0.0}[key]

    for key in ("D", "U", "H"):
        want = torch.tensor([stat(1, r, key) - stat(2, r, key) for r in range(R)], dtype=torch.float64)
        lo, hi = metrics.paired_difference(reps[key], [(1, 2)])
        assert (lo, hi) == pytest.approx(metrics.percentile_interval(want), abs=1e-12)
        pooled = torch.tensor([(stat(1, r, key) - stat(2, r, key) + stat(0, r, key) - stat(2, r, key)) / 2
                               for r in range(R)], dtype=torch.float64)
        assert metrics.paired_difference(reps[key], [(1, 2), (0, 2)]) == pytest.approx(
            metrics.percentile_interval(pooled), abs=1e-12)
    lo, hi = metrics.paired_difference(reps["U"], [(1, 2)])
    u1, u2 = metrics.percentile_interval(reps["U"][1]), metrics.percentile_interval(reps["U"][2])
    assert hi - lo < min(u1[1] - u1[0], u2[1] - u2[0])


def test_ratio_replicates_share_one_draw_across_models():
    num = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]])
    den = torch.ones(2, 4)
    reps = metrics.ratio_replicates(num, den, 50, 1)
    assert torch.allclose(reps[1], 2 * reps[0])      # the same sequences drawn for both rows
    idx = metrics.bootstrap_indices(4, 50, 1)
    assert torch.allclose(reps[0], num[0][idx].sum(-1).double() / 4)
