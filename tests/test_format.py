import pytest
import torch

from ospo.format import FormatCheck, format_ok_rate


def test_plain_query_passes():
    check = FormatCheck()
    assert check("warm insulated kids ski jacket waterproof")
    assert check.reasons("warm insulated kids ski jacket", True) == []


def test_requires_eos_unless_disabled():
    assert not FormatCheck()("ski jacket", ended_with_eos=False)
    assert FormatCheck().reasons("ski jacket", False) == ["no_eos"]
    assert FormatCheck(require_eos=False)("ski jacket", ended_with_eos=False)


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that",
        "I\u2019m sorry, I cannot do that",  # curly apostrophe
        "Sure! ski jacket kids",
        "sure, kids ski jacket",
        "Here is an expanded query: kids ski jacket",
        "here's the query: kids ski jacket",
        "As an AI language model I suggest jackets",
        "assistant kids ski jacket",
        "query:kids ski jacket",
    ],
)
def test_chat_phrases_are_rejected(text):
    check = FormatCheck()
    assert not check(text)
    assert any(r.startswith("banned_phrase") for r in check.reasons(text))


def test_banned_phrases_match_whole_words_only():
    check = FormatCheck()
    assert check("where is the ensured pressure washer")  # "here is", "sure" inside words
    assert check("assistants desk chair") is True  # "assistant" only as a whole word


def test_length_and_line_rules():
    check = FormatCheck(max_words=4, max_chars=20, min_words=2)
    assert check.reasons("a b c d e") == ["too_many_words(5>4)"]
    assert check.reasons("jacket") == ["too_few_words(1<2)"]
    assert check.reasons("   ") == ["too_few_words(0<2)"]
    assert check.reasons("averyveryverylong wordsthatoverflow") == ["too_many_chars(35>20)"]
    assert check.reasons("ski jacket\nkids") == ["multi_line"]
    assert FormatCheck(single_line=False)("ski jacket\nkids")
    assert check("  ski jacket \n")  # surrounding whitespace is stripped first


def test_reasons_lists_every_broken_rule():
    check = FormatCheck(max_words=3)
    assert check("x", True) is True
    reasons = check.reasons("Sure here is\nthe query", ended=False)
    assert set(reasons) >= {"no_eos", "too_many_words(5>3)", "multi_line"}
    assert "banned_phrase('Sure')" in reasons
    assert "banned_phrase('Here is')" in reasons


def test_custom_banned_phrases_and_validation():
    check = FormatCheck(banned_phrases=["cheap"])
    assert not check("cheap ski jacket")
    assert check("Sure ski jacket")  # the defaults are replaced
    assert FormatCheck(banned_phrases=())("Sure ski jacket")
    with pytest.raises(ValueError, match="min_words"):
        FormatCheck(min_words=5, max_words=2)
    with pytest.raises(ValueError, match="max_chars"):
        FormatCheck(max_chars=0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        FormatCheck(max_new_tokens=0)


def test_format_ok_rate():
    texts = ["ski jacket", "Sure! ski jacket", "kids jacket", ""]
    assert format_ok_rate(texts) == pytest.approx(0.5)
    assert format_ok_rate(texts, [True, True, False, True]) == pytest.approx(0.25)
    assert format_ok_rate(texts, torch.tensor([True, True, True, True])) == pytest.approx(0.5)
    assert FormatCheck(banned_phrases=()).rate(texts) == pytest.approx(0.75)
    assert format_ok_rate([]) == 0.0
    with pytest.raises(ValueError, match="len"):
        format_ok_rate(texts, [True])


def test_format_ok_flags_each_text_and_checks_lengths():
    from ospo.format import format_ok

    check = FormatCheck(max_words=3)
    texts = ["red shoes", "a b c d", "Sure, red"]
    assert format_ok(texts, [True, True, True], check) == [True, False, False]
    assert format_ok(texts[:1], [False], check) == [False]  # no EOS
    assert format_ok_rate(texts, None, check) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="len\\(ended\\)=1 != len\\(texts\\)=3"):
        format_ok(texts, [True], check)
