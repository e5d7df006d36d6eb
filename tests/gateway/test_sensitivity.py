"""Sensitivity classification: each PII detector (checksums, boundaries, full-width digits, context),
the policy (tenant, header, key minimum, keywords, patterns), the labelled corpus, and properties."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from seekserve.gateway.errors import GatewayError
from seekserve.gateway.sensitivity import (
    ALL_DETECTORS,
    Classification,
    Finding,
    Level,
    SensitivityClassifier,
    SensitivityPolicy,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "sensitivity_corpus.jsonl"
CLF = SensitivityClassifier()

# all fake: GB 11643 example ID, a Visa test number, UnionPay-shaped numbers with a valid Luhn digit
ID_X = "11010519491231002X"
ID_DIGIT = "440305199003071236"
CARD_VISA = "4111111111111111"
CARD_UNIONPAY19 = "6222021234567890128"


def spans(text: str, policy: SensitivityPolicy | None = None) -> list[tuple[str, str]]:
    clf = CLF if policy is None else SensitivityClassifier(policy)
    return [(f.kind, text[f.start:f.end]) for f in clf.classify([text], "acme").findings]


def kinds(text: str) -> set[str]:
    return {kind for kind, _ in spans(text)}


def id_checksum(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights, strict=True)) % 11]


def test_reference_values_are_well_formed() -> None:
    assert id_checksum(ID_X[:17]) == "X" and id_checksum(ID_DIGIT[:17]) == ID_DIGIT[17]


# --- cn_id ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, found", [
    (f"身份证号 {ID_X} 请核实", ID_X),
    (f"resident ID {ID_DIGIT}.", ID_DIGIT),
    (f"身份证{ID_X.lower()}", ID_X.lower()),
    ("证件号 110105 19491231 002X", "110105 19491231 002X"),
    ("老身份证号是110105491231002，新证还没办", "110105491231002"),   # 15-digit legacy, date 1949-12-31
])
def test_cn_id_found(text: str, found: str) -> None:
    assert spans(text) == [("cn_id", found)]


@pytest.mark.parametrize("text", [
    f"ID {ID_DIGIT[:17]}{(int(ID_DIGIT[17]) + 1) % 10}",     # wrong check digit
    "ID 110105194902301234",                                 # wrong check digit and Feb 30
    "ID 00" + ID_X[2:17] + id_checksum("00" + ID_X[2:17]),                  # no province 00
    f"ID {ID_X[:6]}2999{ID_X[10:17]}" + id_checksum(f"{ID_X[:6]}2999{ID_X[10:17]}"),   # born in 2999
    f"订单号 9{ID_DIGIT}",                                    # inside a longer digit run
    "订单号 110105491231002 已发货",                           # legacy shape after an order word
])
def test_cn_id_rejected(text: str) -> None:
    assert "cn_id" not in kinds(text)


def test_cn_id_bad_date_with_valid_checksum_is_rejected() -> None:
    body = "11010519490230123"   # 1949-02-30
    assert kinds(f"ID {body}{id_checksum(body)}") == set()


def test_full_width_digits_are_caught_and_offsets_point_into_the_original() -> None:
    wide = ID_X.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    text = f"体温 36.5℃，身份证号：{wide}（已核实）"
    (finding,) = CLF.classify([text], "acme").findings
    assert finding.kind == "cn_id"
    assert text[finding.start:finding.end] == wide   # "℃" became two characters; offsets still fit


# --- cn_mobile ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, found", [
    ("手机13812345678，微信同号", "13812345678"),
    ("call 138 1234 5678 after 6pm", "138 1234 5678"),
    ("tel: 159-0123-4567", "159-0123-4567"),
    ("mobile +86 19912345678", "+86 19912345678"),
    ("电话 +86-138-1234-5678", "+86-138-1234-5678"),
    ("0086 13812345678", "0086 13812345678"),
    ("联系电话：１３８１２３４５６７８", "１３８１２３４５６７８"),
    ("1986 13812345678", "13812345678"),   # "86" inside a year is no country code
])
def test_cn_mobile_found(text: str, found: str) -> None:
    assert spans(text) == [("cn_mobile", found)]


@pytest.mark.parametrize("text", [
    "工号 12812345678", "客服 10086 转 1", "room 11012345678", "order 238123456789",
    "手机号 1381234567 少一位", "138 1234 5678 9012 3456", "卡 6138123456789012",
])
def test_cn_mobile_rejected(text: str) -> None:
    assert "cn_mobile" not in kinds(text)


# --- bank_card ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, found", [
    (f"card {CARD_VISA}", CARD_VISA),
    (f"银行卡{CARD_UNIONPAY19}", CARD_UNIONPAY19),
    ("卡号：4111 1111 1111 1111，户名李明", "4111 1111 1111 1111"),
    ("pay with 4111-1111-1111-1111 today", "4111-1111-1111-1111"),
    ("Amex 3782 822463 10005", "3782 822463 10005"),
    ("订单号 20240315001，卡号 4111111111111111", "4111111111111111"),       # the card word is nearer
    (f"身份证 {ID_DIGIT}，押金转至 {CARD_VISA}", CARD_VISA),                 # the ID word labels the ID
])
def test_bank_card_found(text: str, found: str) -> None:
    assert ("bank_card", found) in spans(text)


@pytest.mark.parametrize("text", [
    "卡号 4111111111111112 校验失败",                 # Luhn fails
    f"订单号 {CARD_VISA} 已发货",                     # Luhn-valid order number
    f"Tracking number {CARD_UNIONPAY19}",
    f"invoice #{CARD_VISA} paid",
    f"request_id={CARD_VISA}",
    f"SF{CARD_VISA}",                                  # glued to letters: an identifier
    "条码 6901234567892",                              # 13 digits starting 69: a barcode, not a card
    "ts 1700000000000",                                # millisecond timestamp
    "4111 1111 1111 1111 1111",                        # a fifth group: not a card layout
    f"9{CARD_VISA}",                                   # inside a longer digit run
])
def test_bank_card_rejected(text: str) -> None:
    assert "bank_card" not in kinds(text)


# --- email -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, found", [
    ("mail zhang.san@example.com.", "zhang.san@example.com"),
    ("邮箱：li.na+shop@mail.example.com.cn，谢谢", "li.na+shop@mail.example.com.cn"),
    ("邮箱 wang＠example.cn", "wang＠example.cn"),
    ("zhang [at] example [dot] com", "zhang [at] example [dot] com"),
    ("write to zhang(at)example.com", "zhang(at)example.com"),
    ("zhang AT example.com", "zhang AT example.com"),
    ("zhang at example dot com", "zhang at example dot com"),
    ("邮箱张三@example.cn", "邮箱张三@example.cn"),          # a non-ASCII local part takes the whole word
    ("邮箱zhangsan@example.cn", "zhangsan@example.cn"),
])
def test_email_found(text: str, found: str) -> None:
    assert spans(text) == [("email", found)]


@pytest.mark.parametrize("text", [
    "root@localhost", "@zhangsan 看一下", "Look at example.com for docs", "@Override", "npm i @types/node@20",
    "user@example.c0m",
])
def test_email_rejected(text: str) -> None:
    assert "email" not in kinds(text)


# --- ip ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, found", [
    ("主库 10.12.3.4:5432", "10.12.3.4"),
    ("gateway 192.168.1.1", "192.168.1.1"),
    ("from 203.0.113.9.", "203.0.113.9"),
    ("http://172.16.0.5/admin", "172.16.0.5"),
    ("v6 2001:db8::8a2e:370:7334 now", "2001:db8::8a2e:370:7334"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("upgraded to 2.1.0.3 on server 10.0.0.7", "10.0.0.7"),
])
def test_ip_found(text: str, found: str) -> None:
    assert ("ip", found) in spans(text)


@pytest.mark.parametrize("text", [
    "v1.2.3.4", "version 1.2.3.4", "版本 2.4.1.0", "1.2.3.4.5", "nginx/1.2.3.4", "256.1.1.1",
    "127.0.0.1:8000",
    "0.0.0.0", "mask 255.255.255.0", "169.254.169.254", "224.0.0.1", "::1", "std::vector<int>", "a[::2]",
    "10:23:45", "00:1A:2B:3C:4D:5E", "第 3.2.1.4 条", "fe80::1%eth0",
])
def test_ip_rejected(text: str) -> None:
    assert "ip" not in kinds(text)


# --- passport ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, found", [
    ("护照号码：E12345678", "E12345678"),
    ("G12345678", "G12345678"),
    ("passport EA1234567 ok", "EA1234567"),
    ("Passport No. 561234897 (US)", "561234897"),
    ("我的护照号是 K1234567", "K1234567"),
])
def test_passport_found(text: str, found: str) -> None:
    assert spans(text) == [("passport", found)]


@pytest.mark.parametrize("text", [
    "e12345678", "E1234567", "XE12345678", "EI1234567", "passport number pending", "护照办理需要 7 个工作日",
    "G7 高速", "passport photo 20240315",
])
def test_passport_rejected(text: str) -> None:
    assert "passport" not in kinds(text)


# --- data types ---------------------------------------------------------------------------------------
def test_level_parse() -> None:
    assert Level.parse("public") is Level.public
    assert Level.parse(" Confidential ") is Level.confidential
    assert Level.public < Level.internal < Level.confidential
    with pytest.raises(ValueError, match="secret"):
        Level.parse("secret")


def test_finding_holds_no_text() -> None:
    result = CLF.classify([f"card {CARD_VISA}"], "acme")
    assert [f.name for f in dataclasses.fields(Finding)] == ["kind", "start", "end", "part"]
    assert CARD_VISA not in repr(result) and "1111" not in repr(result.findings)


def test_classification_properties() -> None:
    assert Classification(Level.confidential, (), ()).sensitive
    assert not Classification(Level.internal, (), ()).sensitive
    assert Classification(Level.internal, (), ()).label == "internal"


def test_each_text_is_scanned_on_its_own_and_findings_name_their_part() -> None:
    result = CLF.classify(["hello", f"card {CARD_VISA}", "138"], "acme")
    assert [(f.kind, f.part, f.start, f.end) for f in result.findings] == [("bank_card", 1, 5, 21)]
    assert result.reasons == ("pii:bank_card",) and result.sensitive
    assert CLF.classify(f"card {CARD_VISA}", "acme").sensitive   # a bare string is one text, not characters


# --- policy ------------------------------------------------------------------------------------------
def test_clean_request_is_public() -> None:
    result = CLF.classify(["Summarise the plot of Hamlet in three lines."], "acme")
    assert result == Classification(Level.public, (), ())


def test_tenant_policy_sets_a_minimum() -> None:
    policy = SensitivityPolicy(tenant_levels={"finance": "confidential", "ops": Level.internal})
    clf = SensitivityClassifier(policy)
    assert clf.classify(["hello"], "finance").reasons == ("tenant:finance",)
    assert clf.classify(["hello"], "finance").sensitive
    assert clf.classify(["hello"], "ops").level is Level.internal
    assert clf.classify(["hello"], "acme").level is Level.public


def test_header_only_raises() -> None:
    assert CLF.classify(["hello"], "acme", header="confidential").reasons == ("header:confidential",)
    assert CLF.classify(["hello"], "acme", header=" Internal ").level is Level.internal
    pii = CLF.classify([f"card {CARD_VISA}"], "acme", header="public")
    assert pii.level is Level.confidential and pii.reasons == ("pii:bank_card",)
    clf = SensitivityClassifier(SensitivityPolicy(tenant_levels={"finance": Level.confidential}))
    assert clf.classify(["hello"], "finance", header="public").sensitive


@pytest.mark.parametrize("value", ["secret", "", "PUBLIC!", "2"])
def test_invalid_header_is_a_400(value: str) -> None:
    with pytest.raises(GatewayError) as err:
        CLF.classify(["hello"], "acme", header=value)
    e = err.value
    assert (e.status, e.code, e.param) == (400, "invalid_classification", "X-Data-Classification")
    assert e.message == "X-Data-Classification must be one of public, internal, confidential"


def test_key_minimum_raises() -> None:
    result = CLF.classify(["hello"], "acme", minimum=Level.internal)
    assert (result.level, result.reasons) == (Level.internal, ("key:internal",))


def test_keywords_chinese_and_english_case_insensitive() -> None:
    policy = SensitivityPolicy(keywords=("Project Phoenix", "机密", "PAN"))
    assert spans("re: project PHOENIX kickoff", policy) == [("keyword", "project PHOENIX")]
    assert spans("这是绝密机密文件", policy) == [("keyword", "机密")]
    assert spans("pan 4 is hot", policy) == [("keyword", "pan")]
    assert spans("company expansion", policy) == []            # English keywords match whole words
    wide = "ＰＲＯＪＥＣＴ phoenix"   # full-width letters
    assert spans(wide, policy) == [("keyword", wide)]
    result = SensitivityClassifier(policy).classify(["机密"], "acme")
    assert result.sensitive and result.reasons == ("keyword",)


def test_custom_pattern_and_levels() -> None:
    policy = SensitivityPolicy(patterns={"employee_id": r"EMP-\d{6}", "empty": r"x*"},
                               keyword_level=Level.internal, pii_level=Level.internal)
    result = SensitivityClassifier(policy).classify(["ticket by EMP-004211"], "acme")
    assert [(f.kind, f.start, f.end) for f in result.findings] == [("pattern:employee_id", 10, 20)]
    assert (result.level, result.reasons) == (Level.internal, ("pattern:employee_id",))
    assert SensitivityClassifier(policy).classify([f"card {CARD_VISA}"], "acme").level is Level.internal


def test_default_level() -> None:
    clf = SensitivityClassifier(SensitivityPolicy(default_level="internal"))
    assert clf.classify(["hi"], "acme").reasons == ("default:internal",)


def test_disabled_detector() -> None:
    policy = SensitivityPolicy(detectors=ALL_DETECTORS - {"ip"})
    assert spans("server 10.0.0.7", policy) == []
    assert spans(f"card {CARD_VISA}", policy) == [("bank_card", CARD_VISA)]


@pytest.mark.parametrize("kwargs, message", [
    ({"patterns": {"broken": "(unclosed"}}, "broken"),
    ({"detectors": frozenset({"ip", "ssn"})}, "ssn"),
    ({"keywords": ("ok", " ")}, "keyword"),
    ({"tenant_levels": {"finance": "top"}}, "top"),
])
def test_invalid_policy(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SensitivityPolicy(**kwargs)


# --- the labelled corpus --------------------------------------------------------------------------------
def test_corpus_recall_and_precision() -> None:
    items = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    assert len(items) >= 320
    positives = [i for i in items if i["pii"]]
    assert 0.4 <= len(positives) / len(items) <= 0.6
    assert {k for i in positives for k in i["kinds"]} == ALL_DETECTORS
    assert {i["lang"] for i in items} == {"zh", "en", "mixed"}
    predicted = [CLF.classify([i["text"]], "acme").sensitive for i in items]
    tp = sum(p and i["pii"] for p, i in zip(predicted, items, strict=True))
    recall, precision = tp / len(positives), tp / max(1, sum(predicted))
    assert recall >= 0.99 and precision >= 0.95, (recall, precision)


# --- properties ---------------------------------------------------------------------------------------
TRICKY = st.text(alphabet="0123456789０１２３ -.:@+xXEGat[]()卡号订单护照℃ﬁ é", max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=80), TRICKY), max_size=3))
def test_classify_never_raises_and_spans_fit(texts: list[str]) -> None:
    result = CLF.classify(texts, "acme")
    for f in result.findings:
        assert 0 <= f.start < f.end <= len(texts[f.part])
    assert result.level is (Level.confidential if result.findings else Level.public)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=60), TRICKY), max_size=3), st.one_of(st.text(max_size=60), TRICKY),
       st.sampled_from([None, "public", "internal", "confidential"]))
def test_adding_text_never_lowers_the_level(texts: list[str], extra: str, header: str | None) -> None:
    before = CLF.classify(texts, "acme", header)
    after = CLF.classify([*texts, extra], "acme", header)
    assert after.level >= before.level
    assert set(before.findings) <= set(after.findings)


def test_nfkc_changed_text_maps_back() -> None:
    text = "ﬁle ﬁle 手机１３８１２３４５６７８"
    (f,) = CLF.classify([text], "acme").findings
    assert unicodedata.normalize("NFKC", text[f.start:f.end]) == "13812345678"


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(alphabet="0123456789 -.:@/abcdefEGDNSXx护照身份证卡号手机１２３：＠\n", max_size=60),
                 st.lists(st.sampled_from(["passport", "PASSPORT", "Passport no.", "护照", "E", "G", "EA", " ", ":",
                                           "1234567", "12345678", "A1B2C3", "123", "9", "İ", "-", "\n"]),
                          max_size=12).map("".join)))
@example("EA1234567")                  # a passport from its digit run alone
@example("passport: A1B2C3")           # a passport from the word alone (no run of 7 or 8 digits)
@example("İ PASSPORT no. X12Y34")      # lower() grew the text: the word is found in the text as it is
def test_detector_gates_never_change_the_findings(text: str) -> None:
    """GATES skip a detector only when the text lacks what it needs: the findings are those of running
    every detector."""
    gated = SensitivityClassifier()
    ungated = SensitivityClassifier()
    ungated._detectors = [(kind, find, None) for kind, find, _ in ungated._detectors]
    assert gated.scan(text) == ungated.scan(text)


FRESH = SensitivityClassifier(remember=0)     # scans every text, remembers nothing


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=80), TRICKY, st.sampled_from(["", "手机 13812345678", "a@b.co"])),
                max_size=6), st.integers(0, 5))
def test_remembered_findings_are_a_fresh_scans(texts: list[str], part: int) -> None:
    """The findings of a text seen before (same text again, at another position or in another request) are
    those of scanning it now."""
    clf = SensitivityClassifier(remember=4)
    for _ in range(2):
        for i, text in enumerate(texts):
            assert clf.scan(text, part + i) == FRESH.scan(text, part + i)
        assert clf.classify(texts, "acme") == FRESH.classify(texts, "acme")
    assert len(clf._seen) <= 4


def test_remembered_texts_are_bounded_digests_least_recently_used_dropped() -> None:
    clf = SensitivityClassifier(remember=3)
    for text in ("a", "b", "c"):
        clf.scan(text)
    clf.scan("a")           # used again: "b" is now the least recently used
    clf.scan("身份证 " + ID_X)
    assert len(clf._seen) == 3
    assert all(isinstance(k, bytes) and len(k) == 16 for k in clf._seen)    # digests, never the text
    digest = lambda text: hashlib.blake2b(text.encode(), digest_size=16).digest()
    assert digest("a") in clf._seen and digest("b") not in clf._seen
    assert not any(isinstance(v, str) for rows in clf._seen.values() for row in rows for v in row[:2])
    fresh = SensitivityClassifier(remember=0)
    assert [fresh.scan(t) for t in ("b", "a", "身份证 " + ID_X)] == [clf.scan(t) for t in ("b", "a", "身份证 " + ID_X)]
