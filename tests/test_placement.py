import pytest
from hypothesis import given
from hypothesis import strategies as st

from alternas.errors import PlacementError
from alternas.placement import Placement, feature_sizes, validate_for_model

stage_text = st.text(alphabet="CM", min_size=1, max_size=8)
placements = st.lists(stage_text, min_size=1, max_size=5).map(lambda s: Placement(tuple(s)))


@given(placements)
def test_parse_format_is_identity(placement: Placement) -> None:
    assert Placement.parse(str(placement)) == placement


@given(placements, st.sampled_from([str.lower, str.upper]))
def test_parse_ignores_case_and_whitespace(placement: Placement, case) -> None:
    messy = " , ".join(" ".join(case(stage)) for stage in placement.stages)
    assert Placement.parse(messy) == placement


@given(st.lists(st.integers(1, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n // 2))), min_size=1,
                max_size=5))
def test_from_counts_and_msa_counts_invert(pairs) -> None:
    depths = [n for n, _ in pairs]
    counts = tuple(k for _, k in pairs)
    placement = Placement.from_counts(depths, counts)
    assert placement.depths == tuple(depths)
    assert placement.msa_counts() == counts


def test_reference_pattern_matches_paper_models() -> None:
    assert str(Placement.from_counts((3, 4, 6, 4), (0, 1, 1, 2))) == "CCC,CCCM,CCCCCM,CMCM"
    assert str(Placement.from_counts((3, 4, 6, 4), (0, 1, 3, 2))) == "CCC,CCCM,CMCMCM,CMCM"
    assert Placement.parse("CCC,CCMC,CCCCCM,CMCM").msa_counts() is None


def test_positions_and_description() -> None:
    p = Placement.parse("CCC,CCCM,CCCCCM,CMCM")
    assert p.msa_positions() == ((), (4,), (6,), (2, 4))
    assert p.describe() == "c2:{4} c3:{6} c4:{2,4}"
    assert p.num_msa == 4
    assert p.blocks()[3] == (1, 0, "conv")


def test_build_up_move_alternates_from_the_end() -> None:
    p = Placement.all_conv((3, 4, 6, 4))
    seq = [p]
    while (nxt := seq[-1].add_msa(2)) is not None:
        seq.append(nxt)
    assert [s.stages[2] for s in seq] == ["CCCCCC", "CCCCCM", "CCCMCM", "CMCMCM"]
    # the first (strided) block is never proposed; a 3-block stage takes only one MSA
    three = Placement.parse("CCC,C,C,C")
    assert str(three.add_msa(0)) == "CCM,C,C,C"
    assert three.add_msa(0).add_msa(0) is None
    assert Placement.parse("C,C,C,C").add_msa(1) is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("CC,CX", "unknown block letter 'X' at character 5 (stage 2)"),
        ("CC,,CM", "stage 2 is empty"),
        (",CC", "stage 1 is empty"),
        ("CC,CM,", "stage 3 is empty"),
        ("   ", "empty placement"),
        ("CC;CM", "unknown block letter ';' at character 3"),
    ],
)
def test_parse_errors_point_at_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(PlacementError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Placement.parse(text)


def test_from_counts_rejects_too_many_msas() -> None:
    with pytest.raises(PlacementError, match="stage 2: 3 MSA block"):
        Placement.from_counts((3, 4), (0, 3))


def test_feature_sizes() -> None:
    assert feature_sizes(32, 4, stem_pool=False) == (32, 16, 8, 4)
    assert feature_sizes(224, 4, stem_pool=True) == (56, 28, 14, 7)
    assert feature_sizes(225, 4, stem_pool=True) == (57, 29, 15, 8)


@pytest.mark.parametrize(
    ("text", "kwargs", "fragment"),
    [
        ("CC,CM,CM", {}, "has 3 stage"),
        ("CC,MC,CM,CM", {}, "stage 2 starts with M"),
        ("CC,CM,CM,CM", {"window_size": 3}, "stage 2 holds an MSA block but its 16x16"),
        ("CC,CC,CM,CC", {"image_size": 224, "stem_pool": True, "window_size": 4}, "14x14"),
    ],
)
def test_model_validation_errors(text: str, kwargs: dict, fragment: str) -> None:
    args = {"num_stages": 4, "image_size": 32, "window_size": 4, "stem_pool": False, **kwargs}
    with pytest.raises(PlacementError, match=fragment):
        validate_for_model(Placement.parse(text), **args)


def test_first_stage_may_start_with_msa() -> None:
    validate_for_model(Placement.parse("MC,CC,CC,CM"), num_stages=4, image_size=32, window_size=4,
                       stem_pool=False)
