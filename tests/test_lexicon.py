import pytest

from optout.errors import LexiconError
from optout.lexicon import HERE, load_lexicon
from optout.text import tokenise

REQUIRED = {"en", "de", "fr", "es", "it", "nl", "pt", "pl", "sv", "da", "ja", "zh"}


def table(tmp_path, body, name="xx"):
    (tmp_path / f"{name}.toml").write_text(f'language = "{name}"\n{body}', encoding="utf-8")
    return load_lexicon(tmp_path)


def matches(lexicon, text):
    return [(m.phrase.category, m.start, m.end) for m in lexicon.phrases.find(tokenise(text))]


def test_the_shipped_tables_load_and_cover_the_required_languages(lexicon):
    assert REQUIRED <= set(lexicon.languages)
    assert lexicon.phrase_count > 500


def test_every_shipped_table_has_the_core_sections():
    for path in HERE.glob("*.toml"):
        single = load_lexicon(HERE, (path.stem,))
        categories = {p.category for ps in single.phrases.exact.values() for p in ps}
        categories |= {p.category for ps in single.phrases.prefix.values() for p in ps}
        categories |= {p.category for ps in single.phrases.suffix.values() for p in ps}
        categories |= {p.category for p in single.phrases.loose}
        for needed in ("opt-out.newsletters", "access.access", "deletion.erasure", "deletion.child"):
            assert needed in categories, (path.name, needed)


def test_groups_gaps_and_wildcards(tmp_path):
    lexicon = table(tmp_path, '[deletion]\nerasure = ["(delete|erase) ... (data|account)", "*loeschung", "unsub*"]\n')
    assert matches(lexicon, "please delete all of my data")
    assert not matches(lexicon, "please delete things. my data")  # a gap never crosses a sentence end
    assert matches(lexicon, "Datenloeschung bitte")
    assert matches(lexicon, "unsubscribing now")


def test_optional_group_and_nested_groups(tmp_path):
    lexicon = table(tmp_path, '[opt-out]\nall = ["stop (sending (me|us) |)emails"]\n')
    assert matches(lexicon, "stop emails")
    assert matches(lexicon, "stop sending us emails")
    assert not matches(lexicon, "stop sending them emails")


def test_folding_makes_accents_and_case_irrelevant(tmp_path):
    lexicon = table(tmp_path, '[deletion]\nerasure = ["Löschen Sie"]\n')
    assert matches(lexicon, "bitte LOSCHEN sie")


def test_cjk_phrases_match_character_by_character(tmp_path):
    lexicon = table(tmp_path, '[opt-out]\nnewsletters = ["配信...停止"]\n', "ja")
    assert matches(lexicon, "メルマガの配信を停止してください")


@pytest.mark.parametrize("body, complaint", [
    ('[deletion]\nerasure = ["(delete|erase"]\n', "unclosed"),
    ('[deletion]\nerasure = ["... data"]\n', "gap"),
    ('[deletion]\nerasure = ["de*"]\n', "too short"),
    ('[deletion]\nerasure = "delete"\n', "list of strings"),
    ('[deletion]\nerase = ["delete"]\n', "unknown keys"),
    ('surprise = 1\n', "unknown keys"),
    ('[text]\nattribution = ["(unclosed"]\n', "attribution"),
])
def test_bad_tables_are_refused_with_the_file_and_the_reason(tmp_path, body, complaint):
    with pytest.raises(LexiconError) as error:
        table(tmp_path, body)
    assert "xx.toml" in str(error.value)
    assert complaint in str(error.value)


def test_language_must_match_the_file_name(tmp_path):
    (tmp_path / "de.toml").write_text('language = "fr"\n', encoding="utf-8")
    with pytest.raises(LexiconError, match="language must be 'de'"):
        load_lexicon(tmp_path)


def test_a_missing_language_is_named(tmp_path):
    with pytest.raises(LexiconError, match="no phrase table"):
        load_lexicon(HERE, ("en", "xx"))
