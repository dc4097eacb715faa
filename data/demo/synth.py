"""Deterministic synthetic corpus: zh / en prose, code, markdown, math, PII and junk.

Everything here is generated from word lists written for this project (and, for
code, the Python standard library's own source files), so the demo corpus, the
tests and the benchmarks are license-clean and reproducible from a seed. The
prose is not meant to read well; it is meant to have the statistics the
filters look at (character classes, punctuation, line structure) and enough
vocabulary that distinct documents share few character 5-grams.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path


def _words(block: str) -> tuple[str, ...]:
    return tuple(block.split())


ZH_NOUNS = _words(
    """
    城市 农村 学校 医院 工厂 公司 政府 市场 银行 科学家 工程师 老师 学生 医生 农民 作家
    记者 数据 模型 算法 芯片 电池 能源 气候 河流 森林 山脉 海洋 铁路 机场 港口 图书馆
    博物馆 历史 文化 经济 法律 教育 艺术 音乐 电影 小说 诗歌 哲学 数学 物理 化学 生物
    地理 天文 产品 服务 用户 平台 社区 项目 团队 计划 政策 标准 系统 网络 软件 硬件
    服务器 数据库 茶叶 稻米 小麦 蔬菜 水果 咖啡 面包 饺子 火锅 月饼 书法 京剧 瓷器 丝绸
    长城 运河
    """
)
ZH_VERBS = _words(
    """
    研究 发展 建设 改善 推动 支持 分析 讨论 设计 制造 生产 销售 使用 管理 保护 提高
    降低 组织 参加 介绍 解释 证明 发现 观察 记录 评估 测试 训练 部署 优化 修复 学习
    理解 比较 翻译 整理 收集 分享 宣布 开放 关闭 扩大 减少 增加 完成 开始 继续 坚持
    调整 规划
    """
)
ZH_ADJS = _words(
    """
    重要 复杂 简单 新颖 传统 现代 有效 稳定 安全 可靠 高效 便宜 昂贵 清楚 明显 丰富
    优秀 普通 特殊 广泛 深入 基本 主要 长期 短期 公开 独立 具体 积极 困难
    """
)
ZH_ADVS = _words(
    """
    已经 正在 逐步 不断 认真 积极 仍然 经常 终于 同时 首先 其次 最后 特别 非常 进一步
    """
)
ZH_PLACES = _words(
    """
    北京 上海 广州 深圳 杭州 成都 武汉 西安 南京 重庆 天津 苏州 长沙 郑州 青岛 厦门
    昆明
    """
)
ZH_TIMES = _words(
    """
    今年 去年 上个月 最近 过去十年 本季度 周末 早上 晚上 春天 秋天 假期期间
    """
)
ZH_CONNECT = _words(
    """
    因此 但是 此外 然而 同时 另外 所以 尽管如此 换句话说 总的来说 与此相反
    """
)
EN_NOUNS = _words(
    """
    city village school hospital factory company government market bank scientist
    engineer teacher student doctor farmer writer reporter dataset model algorithm
    chip battery energy climate river forest mountain ocean railway airport
    harbor library museum history culture economy law education music film
    novel poem philosophy mathematics physics chemistry biology geography astronomy product
    service user platform community project team plan policy standard system
    network software hardware server database garden kitchen bridge tunnel satellite
    telescope orchestra harvest festival council committee neighborhood archive laboratory vaccine
    protein molecule galaxy volcano glacier desert
    """
)
EN_VERBS = _words(
    """
    study develop build improve promote support analyze discuss design manufacture
    produce sell use manage protect raise reduce organize attend introduce
    explain prove discover observe record evaluate test train deploy optimize
    repair learn understand compare translate collect share announce open close
    expand increase complete begin continue adjust plan measure publish review
    """
)
EN_ADJS = _words(
    """
    important complex simple new traditional modern effective stable safe reliable
    efficient cheap expensive clear obvious rich excellent ordinary special broad
    deep basic main long-term public independent specific active difficult remote
    urban rural digital ancient careful quiet rapid
    """
)
EN_ADVS = _words(
    """
    already gradually steadily carefully actively still often finally quickly slowly
    rarely
    """
)
EN_PLACES = _words(
    """
    London Paris Berlin Tokyo Nairobi Lima Oslo Toronto Sydney Madrid
    Lisbon Dublin Seoul Cairo
    """
)
EN_CONNECT = (
    "Therefore",
    "However",
    "In addition",
    "Meanwhile",
    "As a result",
    "For example",
    "In contrast",
    "Overall",
    "Nevertheless",
    "Moreover",
)

ZH_CLAUSES = ("为了{v}{n}", "在{n}方面", "根据{n}的{n}", "随着{n}的{v}", "通过{v}{n}", "针对{n}")
EN_CLAUSES = ("to {v} the {n}", "in terms of {n}", "according to the {n}", "as the {n} grows", "by the {n}")
EN_TIMES = ("this year", "last year", "last month", "recently", "over the past decade", "this spring")


def _maybe(rng: random.Random, text: str, p: float = 0.5) -> str:
    return text if rng.random() < p else ""


def zh_sentence(rng: random.Random) -> str:
    """A clause built from random parts with few fixed characters, so 5-grams rarely repeat."""
    c = rng.choice
    parts = [
        _maybe(rng, c(ZH_TIMES) + "，", 0.3),
        _maybe(rng, c(ZH_CLAUSES).format(v=c(ZH_VERBS), n=c(ZH_NOUNS)) + "，", 0.3),
        _maybe(rng, c(ZH_PLACES) + "的", 0.4),
        c(ZH_NOUNS),
        _maybe(rng, c(ZH_ADVS), 0.6),
        c(ZH_VERBS),
        _maybe(rng, "了", 0.4),
        _maybe(rng, c(ZH_ADJS) + "的", 0.5),
        c(ZH_NOUNS),
        _maybe(rng, c(ZH_NOUNS), 0.3),
        _maybe(rng, "，" + c(ZH_CONNECT) + c(ZH_NOUNS) + c(ZH_VERBS) + c(ZH_NOUNS), 0.4),
    ]
    return "".join(parts) + c("。。。！？；")


def en_sentence(rng: random.Random) -> str:
    c = rng.choice
    parts = [
        _maybe(rng, c(EN_CONNECT) + ", ", 0.25),
        _maybe(rng, c(EN_TIMES).capitalize() + ", ", 0.25),
        c(("the", "a", "every", "one", "our", "their"))
        + " "
        + _maybe(rng, c(EN_ADJS) + " ", 0.5)
        + c(EN_NOUNS),
        _maybe(rng, " in " + c(EN_PLACES), 0.35),
        " " + _maybe(rng, c(EN_ADVS) + " ", 0.4) + c(EN_VERBS) + c(("s", "ed", "s", "ed", "")),
        " " + c(("the", "a", "some", "many", "two")) + " " + _maybe(rng, c(EN_ADJS) + " ", 0.5) + c(EN_NOUNS),
        _maybe(rng, " " + c(EN_CLAUSES).format(v=c(EN_VERBS), n=c(EN_NOUNS)), 0.4),
    ]
    sentence = "".join(parts)
    return sentence[0].upper() + sentence[1:] + c("...!?")


def _paragraphs(rng: random.Random, sentence, joiner: str, sentences: int) -> str:
    paras, left = [], sentences
    while left > 0:
        take = min(left, rng.randint(2, 6))
        paras.append(joiner.join(sentence(rng) for _ in range(take)))
        left -= take
    return "\n".join(paras)


def zh_doc(rng: random.Random, sentences: int | None = None) -> str:
    return _paragraphs(rng, zh_sentence, "", sentences or rng.randint(8, 40))


def en_doc(rng: random.Random, sentences: int | None = None) -> str:
    return _paragraphs(rng, en_sentence, " ", sentences or rng.randint(6, 30))


def markdown_doc(rng: random.Random) -> str:
    lines = [f"# {rng.choice(EN_ADJS).capitalize()} {rng.choice(EN_NOUNS)} notes", ""]
    for _ in range(rng.randint(2, 4)):
        lines += [f"## {rng.choice(EN_NOUNS).capitalize()}", "", en_sentence(rng), ""]
        lines += [f"- **{rng.choice(EN_NOUNS)}**: {en_sentence(rng)}" for _ in range(rng.randint(2, 5))]
        lines += ["", "| key | value |", "|---|---|"]
        lines += [f"| `{rng.choice(EN_NOUNS)}` | {rng.randint(1, 999)} |" for _ in range(3)]
        lines.append("")
    return "\n".join(lines)


def math_doc(rng: random.Random) -> str:
    a, b, c = (rng.randint(2, 40) for _ in range(3))
    x = rng.choice("xyzt")
    steps = [
        f"Solve ${a}{x} + {b} = {c}$ for ${x}$.",
        f"Subtracting ${b}$ from both sides gives ${a}{x} = {c - b}$.",
        f"Dividing by ${a}$ we get ${x} = \\frac{{{c - b}}}{{{a}}}$.",
        f"Check: ${a} \\cdot \\frac{{{c - b}}}{{{a}}} + {b} = {c}$, so the solution is correct.",
        f"Theorem. For every integer $n \\ge {a % 5 + 1}$, $\\sum_{{k=1}}^{{n}} k = \\frac{{n(n+1)}}{{2}}$.",
        "Proof. By induction on $n$: the base case holds and the step adds $n+1$ to both sides.",
    ]
    return "\n".join(steps + [en_sentence(rng) for _ in range(rng.randint(1, 3))])


def stdlib_sources() -> list[Path]:
    """The standard library's .py files, sorted, as a license-clean source of code text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}")
    return files


def code_doc(rng: random.Random, files: list[Path], max_lines: int = 120) -> str:
    lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines()
    start = rng.randrange(max(1, len(lines) - max_lines))
    return "\n".join(lines[start : start + rng.randint(max_lines // 3, max_lines)])


# --- PII: valid and look-alike-but-invalid values ---------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def prc_id(rng: random.Random, valid: bool = True) -> str:
    body = f"{rng.choice((110101, 310104, 440305, 510107))}{rng.randint(1950, 2005)}"
    body += f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(100, 999)}"
    check = _ID_CHECK[sum(int(d) * w for d, w in zip(body, _ID_WEIGHTS, strict=True)) % 11]
    if not valid:
        check = _ID_CHECK[(_ID_CHECK.index(check) + 1) % 11]
    return body + check


def luhn_card(rng: random.Random, valid: bool = True) -> str:
    digits = [int(d) for d in rng.choice(("622202", "621700", "453201", "520082"))]
    digits += [rng.randint(0, 9) for _ in range(9)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    check = (10 - total % 10) % 10
    return "".join(map(str, digits)) + str(check if valid else (check + 1) % 10)


def email(rng: random.Random) -> str:
    user = rng.choice(EN_NOUNS) + str(rng.randint(1, 999))
    return f"{user}@{rng.choice(('example.com', 'mail.example.org', 'corp.example.cn'))}"


def phone(rng: random.Random) -> str:
    mobile = f"1{rng.choice('3456789')}{rng.randint(0, 9)}{rng.randint(10000000, 99999999)}"
    return rng.choice(
        (
            mobile,
            f"+86 {mobile[:3]} {mobile[3:7]} {mobile[7:]}",
            f"010-{rng.randint(60000000, 89999999)}",
            f"(0755) {rng.randint(2000, 8999)}-{rng.randint(1000, 9999)}",
            f"+1 415 555 {rng.randint(1000, 9999)}",
            f"+44 20 7946 {rng.randint(1000, 9999)}",
        )
    )


def ipv4(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def ipv6(rng: random.Random) -> str:
    return "2001:db8:" + ":".join(f"{rng.randint(0, 0xFFFF):x}" for _ in range(6))


def pii_doc(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A zh document with planted PII; returns (text, values that must vanish, values that must stay)."""
    secret = [email(rng), phone(rng), prc_id(rng), luhn_card(rng), ipv4(rng), ipv6(rng)]
    keep = [
        prc_id(rng, valid=False),
        str(rng.randint(1990, 2024)),
        f"{rng.randint(10, 999)}.{rng.randint(10, 99)}",
    ]
    text = (
        f"{zh_doc(rng, 6)}\n{zh_sentence(rng)}联系邮箱：{secret[0]}，电话 {secret[1]}。{zh_sentence(rng)}\n"
        f"身份证号 {secret[2]}，银行卡 {secret[3]}，登录地址 {secret[4]} 或 {secret[5]}。\n"
        f"{keep[1]}年的价格是 {keep[2]} 元，编号 {keep[0]} 已作废。{zh_sentence(rng)}\n{zh_doc(rng, 6)}"
    )
    return text, secret, keep


# --- near duplicates and junk ------------------------------------------------------------


def perturb(rng: random.Random, text: str, edits: int) -> str:
    """Replace/insert/delete `edits` short spans, keeping most character 5-grams intact."""
    chars = list(text)
    filler = "的了和是在有也就都而及与着" if any("\u4e00" <= c <= "\u9fff" for c in text[:50]) else "aeiou st"
    for _ in range(edits):
        pos = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.4:
            chars[pos] = rng.choice(filler)
        elif op < 0.7:
            chars.insert(pos, rng.choice(filler))
        elif len(chars) > 1:
            del chars[pos]
    return "".join(chars)


def junk_docs(rng: random.Random) -> list[tuple[str, str]]:
    """(expected rule, text) pairs that the default clean rules must reject."""
    url = lambda: f"https://{rng.choice(EN_NOUNS)}.example.com/{rng.randint(1, 99999)}"
    return [
        ("too_short", "点击这里"),
        ("url_ratio", " ".join(url() for _ in range(30))),
        ("line_repetition", "\n".join(["欢迎光临本店，全场包邮！"] * 30 + [zh_sentence(rng)])),
        ("symbol_ratio", "".join(rng.choice("#$%^&*~|<>{}[]") for _ in range(400)) + " ok"),
        ("blocklist", zh_doc(rng, 6) + "\n加微信领取免费彩票福利，" + zh_doc(rng, 3)),
        ("digit_ratio", " ".join(str(rng.randint(10**6, 10**9)) for _ in range(120))),
        ("ngram_repetition", " ".join(["buy cheap watches now"] * 60)),
    ]
