"""Parsing and post-processing of the benchmark tasks on small hand-written samples of the raw formats."""

import hashlib
import json

import pytest

from bench import tasks as T
from bench.common import BenchError

# ----------------------------------------------------------------------------- wn_noun

DATA_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  By obtaining, using  \n"
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its "
    "own distinct existence (living or nonliving)  \n"
    "02958343 06 n 02 car 0 auto 0 001 @ 03791235 n 0000 | a motor vehicle with four wheels; usually propelled by "
    'an internal combustion engine; "he needs a car to get to work"; "a red car"  \n'
    "10129825 18 n 01 girl 0 001 @ 10787470 n 0000 | a young woman; \"a young lady of 18\"  \n"
    "00015388 05 n 01 beast 0 001 @ 00004258 n 0000 | a b  \n"
)


def test_wordnet_parses_label_and_gloss():
    pairs = T.parse_wordnet(DATA_NOUN)
    # license lines and the lexfile 03 (noun.Tops, not in the map) are skipped
    assert pairs == [
        ("a motor vehicle with four wheels; usually propelled by an internal combustion engine", "noun.artifact"),
        ("a young woman", "noun.person"),
        ("a b  ", "noun.animal"),
    ]
    splits, stats = T.postprocess(pairs, T.TASK_LABELS["wn_noun"], *T.LENGTHS["wn_noun"])
    # normalised; "a b" is shorter than 10 characters
    assert stats["uncapped"]["noun.person"] == 1 and stats["uncapped"]["noun.animal"] == 0
    texts = {t for rows in splits.values() for t, _ in rows}
    assert "a young woman" in texts


# ----------------------------------------------------------------------------- gcide_subject

GCIDE = """Acacia \\A*ca"ci*a\\, n.; pl. E. {Acacias}, L. {Acaci[ae]}. [L.
   acacia, fr. Gr. ?.]
   1. (Antiq.) A roll or bag, filled with dust, borne by the
      Byzantine emperors, as a memento of mortality.
      [1913 Webster]

   2. (Bot.) A genus of leguminous trees and shrubs, with pinnate leaves. -- Hy`dro*bran"chi*ate, a.
      [1913 Webster]

Abacus \\Ab"a*cus\\, n. (Zool. & Bot.) A compound thing that is skipped here.
   [1913 Webster]

   {Abacus harmonicus} (Mus.), an ancient diagram showing the
      arrangement of the keys or strings of an instrument.
      [1913 Webster]

Hydra \\Hy"dra\\, n. (Zool.)
   A genus of fresh-water hydroids, with a tubular body. --Huxley.
   [1913 Webster]

Pike \\Pike\\, n. (Zool.) See {Pickerel}.
   [1913 Webster]

Wort \\Wort\\, n. [Obs.] (Bot.) (a) A plant; an herb. (b) A root of a plant. (Med.) A remedy for the gout.
"""


def test_gcide_tricky_cases():
    pairs = T.parse_gcide(GCIDE)
    assert pairs == [
        # after a sense number; [1913 Webster] removed and whitespace collapsed
        ("A roll or bag, filled with dust, borne by the Byzantine emperors, as a memento of mortality.", "Antiq"),
        # run-on derived word cut
        ("A genus of leguminous trees and shrubs, with pinnate leaves.", "Bot"),
        # after a sub-entry: braces and the leading ", " go
        ("an ancient diagram showing the arrangement of the keys or strings of an instrument.", "Mus"),
        # after the part of speech, definition on the next line; trailing author citation cut
        ("A genus of fresh-water hydroids, with a tubular body.", "Zool"),
        # (Zool. & Bot.) is not a single-subject tag; "See {Pickerel}." is a bare cross-reference (dropped).
        # First tag only, text cut at the next tag; [Obs.] gone. Leading non-word characters are stripped
        # before the (a)/(b) markers are removed, so a leading "(a) " leaves "a) " (this order reproduces
        # the recipe's counts).
        ("a) A plant; an herb. A root of a plant. ", "Bot"),
    ]


def test_gcide_leading_marker_before_see_is_kept():
    pairs = T.parse_gcide("Pike \\Pike\\, n. (Zool.) (a) See {Pickerel}.\n")
    assert pairs == [("a) See Pickerel.", "Zool")]
    assert T.parse_gcide("Pike \\Pike\\, n. (Zool.) Same as {Pickerel}.\n") == []


# ----------------------------------------------------------------------------- kjv_division

KJV_LINES = [
    "Ge1:1 In the beginning God created the heaven and the earth.",
    "1Cor13:4 Charity suffereth long, and is kind; charity envieth not;",
    "SSol1:1 The song of songs, which is Solomon's.",
    "Jude1:25 To the only wise God our Saviour, be glory and majesty.",
    "John11:35 Jesus wept.",
]


def test_kjv_parse():
    assert T.parse_kjv(KJV_LINES) == [
        ("In the beginning God created the heaven and the earth.", "law"),
        ("Charity suffereth long, and is kind; charity envieth not;", "pauline"),
        ("The song of songs, which is Solomon's.", "wisdom"),
        ("To the only wise God our Saviour, be glory and majesty.", "general_rev"),
        ("Jesus wept.", "gospels_acts"),
    ]
    _, stats = T.postprocess(T.parse_kjv(KJV_LINES), T.TASK_LABELS["kjv_division"], *T.LENGTHS["kjv_division"])
    assert sum(stats["uncapped"].values()) == 5  # "Jesus wept." has 11 characters: kept


def test_kjv_every_book_has_a_division_and_unknown_codes_fail():
    assert len(T.KJV_BOOK) == 66
    with pytest.raises(BenchError):
        T.parse_kjv(["Xyz1:1 Unknown book."])
    with pytest.raises(BenchError):
        T.parse_kjv(["not a verse"])


# ----------------------------------------------------------------------------- fortune

FORTUNE = """A day for firm decisions!!!!!  Or is it?
%
	Two-way traffic,
	both ways.
		-- Anon
%
Short.
%
"""


def test_fortune_entries():
    pairs = T.parse_fortune(FORTUNE, "work")
    splits, stats = T.postprocess(pairs, T.TASK_LABELS["fortune"], *T.LENGTHS["fortune"])
    texts = sorted(t for rows in splits.values() for t, _ in rows)
    # whitespace collapsed, attribution kept, "Short." (6 chars) and the empty tail dropped
    assert texts == ["A day for firm decisions!!!!! Or is it?", "Two-way traffic, both ways. -- Anon"]
    assert stats["uncapped"]["work"] == 2


# ----------------------------------------------------------------------------- code_lang

def test_code_chunks_windowing():
    w1 = ["", "", "def f(x):   ", "    if x:", "        return 1", "    return 2", "", "class A:",
          "    pass", "# end of the first window", "", ""]
    w2 = ["a = 1", "", "b = 2", "", "c = 3", "", "d = 4", "", "", "", "", ""]  # 4 non-blank lines
    w3 = ["x"] * 12  # 23 characters: too short
    w4 = ["int f(void);  "] * 5  # last window, 5 lines, 74 characters: too short
    chunks = T.code_chunks("\n".join(w1 + w2 + w3 + w4))
    assert chunks == ["def f(x):\n    if x:\n        return 1\n    return 2\n\nclass A:\n    pass\n"
                      "# end of the first window"]
    long = ["/* a fairly long comment line number %02d */" % i for i in range(12)]
    assert T.code_chunks("\n".join(long)) == ["\n".join(long)]
    assert T.code_chunks("\n".join(long * 4)) == ["\n".join(long)] * 4  # non-overlapping, from line 0


def test_code_lang_keeps_whitespace():
    text = "\n".join(["    indented   line number %d" % i for i in range(6)])
    splits, _ = T.postprocess([(text, "python")], T.TASK_LABELS["code_lang"], *T.LENGTHS["code_lang"],
                              collapse=False)
    assert [t for rows in splits.values() for t, _ in rows] == [text]


# ----------------------------------------------------------------------------- post-processing

def _sha1(t):
    return hashlib.sha1(t.encode("utf-8")).hexdigest()


def test_split_hash():
    # sha1("hello") = aaf4c61d...; 0xaaf4c61d % 100 = 21 -> train
    assert T.split_of("hello") == "train"
    for t in ("alpha", "beta", "gamma", "delta", "epsilon"):
        b = int(_sha1(t)[:8], 16) % 100
        assert T.split_of(t) == ("train" if b < 80 else "val" if b < 90 else "test")


def test_dedup_drops_cross_label_and_collapses_same_label():
    pairs = [
        ("shared text one", "a"), ("shared  text one ", "b"),  # same after normalisation, two labels: dropped
        ("only in a here", "a"), ("only in a here", "a"),      # same label twice: one row
        ("a label not in the list", "z"),
        ("tiny", "a"),                                        # too short
    ]
    splits, stats = T.postprocess(pairs, ["a", "b"], 10, 100)
    rows = [r for s in splits.values() for r in s]
    assert rows == [("only in a here", "a")]
    assert stats["cross_label_dropped"] == 1
    assert stats["uncapped"] == {"a": 1, "b": 0}
    assert stats["raw"] == 5


def test_cap_keeps_smallest_cap_hash_and_rows_sorted_by_sha1():
    texts = [f"text number {i:03d}" for i in range(40)]
    splits, stats = T.postprocess([(t, "a") for t in texts] + [("other label text", "b")], ["a", "b"], 5, 100, cap=7)
    kept = sorted(t for s in splits.values() for t, lab in s if lab == "a")
    expected = sorted(sorted(texts, key=lambda t: hashlib.sha1(b"cap\0" + t.encode()).hexdigest())[:7])
    assert kept == expected
    assert stats["capped"] == {"a": 7, "b": 1} and stats["uncapped"] == {"a": 40, "b": 1}
    for split, rows in splits.items():
        assert all(T.split_of(t) == split for t, _ in rows)
        assert [_sha1(t) for t, _ in rows] == sorted(_sha1(t) for t, _ in rows)


def test_jsonl_format():
    data = T.jsonl_bytes([("café «x»", "a")])
    assert data == ('{"text": "café «x»", "label": "a"}\n').encode("utf-8")
    assert json.loads(data) == {"text": "café «x»", "label": "a"}


def test_recipe_tables_are_consistent():
    for task, exp in T.EXPECTED.items():
        assert set(exp["uncapped"]) == set(T.TASK_LABELS[task])
        assert exp["capped"] == sum(min(n, T.CAP) for n in exp["uncapped"].values())
        assert exp["train"] + exp["val"] + exp["test"] == exp["capped"]
    assert set(T.TASK_PACKAGES) == set(T.TASK_LABELS) == set(T.SOURCES)


def test_deb_version_from_file_name(tmp_path):
    assert T._deb_version(tmp_path / "fortunes_1%3a1.99.1-7.3_all.deb") == "1:1.99.1-7.3"
    assert T._deb_version(tmp_path / "libc6-dev_2.36-9+deb12u14_amd64.deb") == "2.36-9+deb12u14"
