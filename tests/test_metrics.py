"""Metrics against hand-worked examples."""
import pytest

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
