"""Every planted identifier is masked; look-alikes that fail their checksum, years and prices stay."""

from __future__ import annotations

import random

import pytest

from data.demo import synth
from data.preprocess import pii


def test_planted_pii_is_masked_and_lookalikes_are_left_alone():
    rng = random.Random(3)
    totals = {}
    for _ in range(1500):
        text, secret, keep = synth.pii_doc(rng)
        masked, counts = pii.desensitize(text)
        for value in secret:
            assert value not in masked, (value, masked)
        for value in keep:
            assert value in masked, (value, masked)
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
    for kind in ("email", "id_number", "bank_card", "phone"):
        assert totals[kind] == 1500
    assert totals["ipv4"] + totals["ipv6"] == 3000


@pytest.mark.parametrize(
    "value,kind",
    [
        ("13812345678", "<PHONE>"),
        ("+86 138 1234 5678", "<PHONE>"),
        ("010-62345678", "<PHONE>"),
        ("(0755) 8888-1234", "<PHONE>"),
        ("+1 415 555 2671", "<PHONE>"),
        ("+44 20 7946 0958", "<PHONE>"),
        ("00852 2345 6789", "<PHONE>"),  # 00: the international call prefix
        ("0044 20 7946 0958", "<PHONE>"),
        ("001-415-555-2671", "<PHONE>"),
        ("(415) 555-2671", "<PHONE>"),  # North American formats
        ("415-555-2671", "<PHONE>"),
        ("1-415-555-2671", "<PHONE>"),
        ("415.555.2671", "<PHONE>"),
        ("11010519491231002X", "<ID_NUMBER>"),
        ("4111 1111 1111 1111", "<BANK_CARD>"),
        ("6222021234567890128", "<BANK_CARD>"),
        ("zhang.san+news@mail.example.com", "<EMAIL>"),
        ("192.168.1.20", "<IP>"),
        ("1.0.0.1", "<IP>"),  # a real resolver address, not taken for a version without context
        ("fe80::1ff:fe23:4567:890a", "<IP>"),
    ],
)
def test_each_format_gets_its_typed_placeholder(value, kind):
    masked, _ = pii.desensitize(f"联系方式：{value}，谢谢。")
    assert masked == f"联系方式：{kind}，谢谢。"


@pytest.mark.parametrize(
    "text",
    [
        "2023年的营收是 1999.50 元，增长 12.5%。",
        "订单 11010519491231002 的状态",  # 17 digits: not an ID number
        "身份证号 110105194912310021 校验位错误",  # checksum fails
        "卡号 4111 1111 1111 1112 无效",  # Luhn fails
        "std::vector<int> a; ns::f(); 12:30:45",
        "version 3.11.7 released",
        "version 1.0.0.1 released",  # four-part versions are not IP addresses
        "Version: 10.2.3.4",
        "firmware v1.0.0.1 and V 2.0.0.3",
        "pip install foo==1.2.3.4",
        "升级到版本 4.1.0.2 后",
        "OID 1.3.6.1.4.1 and 1.2.3.4.5",  # longer dotted chains
        "会议时间 2023-10-01 至 2023-10-05，1999-2023 年的数据",  # dates, year ranges
        "售价 415.50 元，折后 299 元，共 3 件",  # prices
        "scores: 100 200 300 400 500 600",  # number lists
        "page 415 555 2671 words",  # digits separated by spaces only: not a phone
        "ISBN 978-3-16-148410-0",
        "call 555-2671 for details",  # 7 digits without an area code
    ],
)
def test_ordinary_numbers_and_code_stay(text):
    masked, counts = pii.desensitize(text)
    assert masked == text and not counts


def test_reposting_boilerplate_lines_are_stripped():
    text = "转载自 某某新闻网\n正文第一段。\n本文来源：网络\n正文第二段。\n原文链接：https://example.com/a"
    masked, counts = pii.desensitize(text)
    assert masked == "正文第一段。\n正文第二段。\n"
    assert counts["repost_line"] == 3


def test_types_can_be_switched_off():
    masked, counts = pii.desensitize("邮箱 a@b.example.com 电话 13812345678", types=("phone",))
    assert masked == "邮箱 a@b.example.com 电话 <PHONE>" and counts == {"phone": 1}


@pytest.mark.parametrize(
    "text,masked",
    [
        ("服务器地址是 10.0.0.1.", "服务器地址是 <IP>."),  # a sentence period after the address
        ("nav 8.8.4.4 ok", "nav <IP> ok"),  # 'v' ending another word is not a version marker
        ("电话：(415) 555 2671。", "电话：<PHONE>。"),
    ],
)
def test_addresses_in_context(text, masked):
    assert pii.desensitize(text)[0] == masked
