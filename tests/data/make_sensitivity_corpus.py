#!/usr/bin/env python3
"""Writes tests/data/sensitivity_corpus.jsonl: labelled, entirely fake Chinese/English prompts for the
sensitivity classifier (half with PII, half tricky negatives). Seeded; the JSONL is checked in.

  python tests/data/make_sensitivity_corpus.py            # rewrites the corpus next to this script

Labels follow the documented detector semantics: PII = one of cn_id, cn_mobile, bank_card, email, ip,
passport. Numbers with a bad checksum, loopback/unspecified/link-local addresses and lower-case
"at ... example.com" prose are not PII; spelled-out addresses ("a [at] b [dot] com") are.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

SEED = 20240611
OUT = Path(__file__).with_name("sensitivity_corpus.jsonl")

# real province+prefecture codes (GB/T 2260), used only to build fake but well-formed IDs
AREAS = ["110105", "110108", "310104", "310115", "440305", "440106", "330106", "510107", "420111", "320102",
         "370202", "610113", "500103", "350203", "430104", "210102", "120101", "130102", "410105", "530102",
         "450103", "340104", "360102", "220102", "230102", "150102", "620102", "640104", "650102", "520102"]
MOBILE_PREFIXES = ["130", "131", "132", "133", "135", "136", "137", "138", "139", "150", "151", "152", "155",
                   "156", "157", "158", "159", "166", "173", "176", "177", "180", "181", "182", "185", "186",
                   "187", "188", "189", "191", "198", "199"]
CARD_IINS = [("622202", 16), ("622202", 19), ("621700", 19), ("622848", 19), ("621483", 16), ("622588", 16),
             ("625807", 16), ("620522", 19), ("4", 16), ("4", 16), ("51", 16), ("53", 16), ("37", 15)]
NAMES = ["zhang.san", "lisi", "wang_wu88", "chen.xiaoming", "liu.yang", "j.smith", "alice.wong", "bob.lee",
         "m.garcia", "kevin.zhao2020", "li.na+shop", "Zhou.Jie", "sun_li", "hr-team", "tom.h"]
DOMAINS = ["example.com", "example.cn", "example.org", "mail.example.com", "example.com.cn", "example.net"]
FULLWIDTH = str.maketrans("0123456789@", "０１２３４５６７８９＠")


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def id_check(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights, strict=True)) % 11]


def birth(rng: random.Random) -> str:
    return f"{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"


def cn_id(rng: random.Random, valid: bool = True) -> str:
    body = rng.choice(AREAS) + birth(rng) + digits(rng, 3)
    check = id_check(body)
    if not valid:
        check = rng.choice([c for c in "0123456789" if c != check])
    return body + check


def luhn_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def luhn_number(rng: random.Random, prefix: str, length: int, valid: bool = True) -> str:
    partial = prefix + digits(rng, length - len(prefix) - 1)
    check = luhn_digit(partial)
    return partial + (check if valid else str((int(check) + rng.randint(1, 9)) % 10))


def group(value: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for size in sizes:
        out.append(value[i:i + size])
        i += size
    if i < len(value):
        out.append(value[i:])
    return sep.join(out)


def fmt_id(rng: random.Random) -> str:
    value, r = cn_id(rng), rng.random()
    if r < 0.1:
        return value.translate(FULLWIDTH)
    if r < 0.15:
        return group(value, [6, 8], " ")
    return value.lower() if r < 0.2 else value


def fmt_id15(rng: random.Random) -> str:
    return rng.choice(AREAS) + birth(rng)[2:] + digits(rng, 3)


def fmt_mobile(rng: random.Random) -> str:
    value, r = rng.choice(MOBILE_PREFIXES) + digits(rng, 8), rng.random()
    if r < 0.1:
        return value.translate(FULLWIDTH)
    if r < 0.25:
        return group(value, [3, 4], " ")
    if r < 0.35:
        return group(value, [3, 4], "-")
    if r < 0.45:
        return "+86 " + value
    if r < 0.5:
        return "+86-" + group(value, [3, 4], "-")
    return ("0086" + value) if r < 0.53 else value


def fmt_card(rng: random.Random) -> str:
    prefix, length = rng.choice(CARD_IINS)
    value, r = luhn_number(rng, prefix, length), rng.random()
    if length == 15:
        return group(value, [4, 6], " ") if r < 0.5 else value
    if r < 0.1:
        return value.translate(FULLWIDTH)
    if r < 0.35:
        return group(value, [4, 4, 4, 4], " ")
    return group(value, [4, 4, 4, 4], "-") if r < 0.45 else value


def fmt_email(rng: random.Random) -> str:
    value = f"{rng.choice(NAMES)}@{rng.choice(DOMAINS)}"
    return value.translate(FULLWIDTH) if rng.random() < 0.08 else value


def fmt_email_obf(rng: random.Random) -> str:
    name, domain = rng.choice(NAMES), rng.choice(DOMAINS)
    style = rng.choice(["bracket", "paren", "AT", "words"])
    if style == "bracket":
        return f"{name} [at] {domain.replace('.', ' [dot] ')}"
    if style == "paren":
        return f"{name}(at){domain}"
    if style == "AT":
        return f"{name} AT {domain}"
    return f"{name} at {domain.replace('.', ' dot ')}"


def fmt_ip(rng: random.Random) -> str:
    return rng.choice([
        f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"203.0.113.{rng.randint(1, 254)}", f"198.51.100.{rng.randint(1, 254)}",
        f"192.0.2.{rng.randint(1, 254)}"])


def fmt_ip6(rng: random.Random) -> str:
    groups = [f"{rng.randint(0, 0xffff):x}" for _ in range(rng.choice([2, 3, 6]))]
    return "2001:db8:" + (":".join(groups) if len(groups) == 6 else ":" + ":".join(groups))


def fmt_passport(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return "E" + digits(rng, 8)
    if r < 0.75:
        return "G" + digits(rng, 8)
    return "E" + rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") + digits(rng, 7)


def fmt_passport_ctx(rng: random.Random) -> str:
    return rng.choice([digits(rng, 9), "K" + digits(rng, 7), "TK" + digits(rng, 7),
                       "C" + digits(rng, 2) + "X" + digits(rng, 2) + "T" + digits(rng, 2)])


PII: dict[str, tuple[str, Callable[[random.Random], str]]] = {
    "id": ("cn_id", fmt_id), "id15": ("cn_id", fmt_id15), "mobile": ("cn_mobile", fmt_mobile),
    "card": ("bank_card", fmt_card), "email": ("email", fmt_email), "email_obf": ("email", fmt_email_obf),
    "ip": ("ip", fmt_ip), "ip6": ("ip", fmt_ip6), "passport": ("passport", fmt_passport),
    "passport_ctx": ("passport", fmt_passport_ctx),
}

NOT_PII: dict[str, Callable[[random.Random], str]] = {
    "luhn_order": lambda r: luhn_number(r, r.choice("2345689") + digits(r, 1), r.choice([16, 18, 19])),
    "order16": lambda r: r.choice("3456") + digits(r, 15),
    "order18": lambda r: "2024" + f"{r.randint(1, 12):02d}{r.randint(1, 28):02d}" + digits(r, 10),
    "bad_id": lambda r: cn_id(r, valid=False),
    "bad_card": lambda r: luhn_number(r, "6222", 16, valid=False),
    "nonmobile11": lambda r: r.choice(["10", "11", "12"]) + digits(r, 9),
    "digits6": lambda r: digits(r, 6), "digits8": lambda r: digits(r, 8), "digits9": lambda r: digits(r, 9),
    "digits12": lambda r: digits(r, 12), "digits13": lambda r: digits(r, 13),
    "ts": lambda r: str(r.randint(1_600_000_000, 1_750_000_000)),
    "ts_ms": lambda r: str(r.randint(1_600_000_000_000, 1_750_000_000_000)),
    "sha1": lambda r: f"{r.getrandbits(160):040x}", "sha256": lambda r: f"{r.getrandbits(256):064x}",
    "uuid": lambda r: "-".join(f"{r.getrandbits(4 * n):0{n}x}" for n in (8, 4, 4, 4, 12)),
    "ean13": lambda r: "69" + digits(r, 11), "isbn13": lambda r: "978" + digits(r, 10),
    "sku": lambda r: f"{r.choice(['HX', 'QW', 'MT'])}-{digits(r, 4)}-{r.choice(['BLK', 'WHT', 'RED'])}",
    "uscc": lambda r: "9111" + digits(r, 13) + r.choice("ABCDEFGHJKLMNPQRTUWY"),
    "ups": lambda r: "1Z" + "".join(r.choice("0123456789ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(16)),
}

# --- templates: written as a user would type them; {placeholders} are filled by the generators above ---
POSITIVE: list[tuple[str, str]] = [
    ("zh", "您好，我想查询一下我的社保缴费记录，身份证号是{id}，谢谢。"),
    ("zh", "客户张女士来电，手机{mobile}，反映信用卡年费扣款有误。"),
    ("zh", "请把退款打到我的银行卡{card}，户名李明。"),
    ("zh", "患者王某，男，45岁，身份证{id}，主诉胸闷两周，联系电话{mobile}。"),
    ("zh", "麻烦把合同发到我邮箱{email}，周五前要。"),
    ("zh", "生产环境数据库主库地址是{ip}，从库在{ip}，不要在工单里公开。"),
    ("zh", "我的护照号码是{passport}，机票预订时填错了一位，能改吗？"),
    ("zh", "快递收件人：陈先生，电话：{mobile}，地址：北京市朝阳区某某路88号。"),
    ("zh", "工资卡卡号：{card}，开户行：中国工商银行北京分行。"),
    ("zh", "登记信息：姓名 刘洋，证件号码 {id}，入住日期 2024-05-02。"),
    ("zh", "报错日志显示连接 {ip}:5432 超时，帮我看看是不是防火墙的问题。"),
    ("zh", "老师您好，我是学生家长，孩子的作业请发到{email}。"),
    ("zh", "订单已发货，如有问题请联系我 {mobile}（微信同号）。"),
    ("zh", "办理签证需要提供护照：{passport}，有效期至2031年。"),
    ("zh", "申请人身份证：{id}；申请人手机：{mobile}；申请额度：5万元。"),
    ("zh", "请核对一下这张信用卡 {card} 上个月的账单，我怀疑被盗刷了。"),
    ("zh", "VPN 分配给你的内网 IP 是 {ip}，网关 {ip}。"),
    ("zh", "我的邮箱 {email} 收不到验证码，手机号是 {mobile}。"),
    ("zh", "家属联系方式：{mobile}（其子），紧急联系人。"),
    ("zh", "保单被保险人身份证号码{id}，受益人为其配偶。"),
    ("zh", "转账失败：收款账号 {card} 户名不符，请核实后重试。"),
    ("zh", "出差人员名单：王磊，护照 {passport}；李静，护照 {passport}。"),
    ("zh", "简历投递：陈晓明，电话{mobile}，邮箱{email}，应聘Java开发。"),
    ("zh", "监控告警：主机 {ip} CPU 使用率超过 95%，持续 10 分钟。"),
    ("zh", "退货联系人 赵女士 {mobile}"),
    ("zh", "身份证 {id} 的客户已经三次逾期还款，请风控跟进。"),
    ("zh", "用户反馈：绑定的银行卡 {card} 无法解绑，已截图。"),
    ("zh", "请帮我把这段话润色一下：“尊敬的客户，您的账户（绑定手机{mobile}）已完成实名认证。”"),
    ("zh", "把下面的表格转成 JSON：\n姓名,身份证号,手机\n李雷,{id},{mobile}\n韩梅梅,{id},{mobile}"),
    ("zh", "新员工入职资料：身份证{id}，工资卡{card}，请人事在周三前录入。"),
    ("zh", "挂号信息：就诊人 孙丽，证件号 {id}，科室 内分泌科。"),
    ("zh", "服务器被 {ip} 持续暴力破解 SSH，已加入黑名单。"),
    ("zh", "我在你们官网注册用的邮箱是 {email}，现在想注销账号。"),
    ("zh", "烦请将报销款转入招商银行卡 {card}。"),
    ("zh", "护照号：{passport}  姓名拼音：ZHANG WEI  签发地：上海"),
    ("zh", "手机号 {mobile} 的用户投诉短信骚扰，请查一下发送记录。"),
    ("zh", "请联系客户经理王经理 {mobile}，或发邮件至 {email_obf}。"),
    ("zh", "Kubernetes 节点 {ip} NotReady，kubelet 日志在附件里。"),
    ("zh", "身份证号码：{id}（复印件已上传）"),
    ("zh", "帮我写一封催款邮件，收件人是 {email}，欠款金额 12,800 元。"),
    ("zh", "您好，您的快递已到驿站，取件码 3-2-1056，收件人手机请核对：{mobile}"),
    ("zh", "银行客服记录：客户来电挂失借记卡 {card}，已冻结。"),
    ("zh", "医院病历摘要：患者赵某某，身份证号 {id}，诊断：2型糖尿病。"),
    ("zh", "HR：请把{email}加入周会邀请。"),
    ("zh", "运维交接：跳板机 {ip}，账号见密码本。"),
    ("zh", "航班改签：乘机人护照号{passport}，原航班 CA981。"),
    ("zh", "请在系统里把客户手机号从{mobile}改为{mobile}。"),
    ("zh", "学生信息导入失败：第 12 行身份证号 {id} 重复。"),
    ("zh", "租房合同：乙方李四，身份证 {id}，押金转至 {card}。"),
    ("zh", "你好，我是 {email}，上周提交的发票一直没审批。"),
    ("zh", "机房新增服务器 {ip}、{ip}，已接入监控。"),
    ("zh", "儿童护照 {passport} 办理进度查询"),
    ("zh", "请不要把这个号码给别人：{mobile}"),
    ("zh", "支付宝提现到 {card} 失败，提示卡状态异常。"),
    ("zh", "体检报告（姓名：周杰，身份证：{id}）已出，请登录查看。"),
    ("zh", "老身份证号是{id15}，新证还没办，社保系统能用吗？"),
    ("zh", "IPv6 地址 {ip6}，前缀长度 64。"),
    ("zh", "我的护照号是 {passport_ctx}（外国护照），入境卡怎么填？"),
    ("zh", "如需发票请发邮件到 {email_obf} 并注明公司抬头。"),
    ("zh", "客户信息：{mobile}，{email}，会员等级：金卡。"),
    ("zh", "麻烦帮我查下这个身份证{id}名下有几张卡。"),
    ("zh", "网络排查：从 {ip} ping 不通 {ip}，丢包 100%。"),
    ("en", "Hi, I can't log in. My account email is {email} and my phone is {mobile}."),
    ("en", "Please refund to my card {card}, the charge on May 3 was a duplicate."),
    ("en", "Patient DOB 1987-04-12, resident ID {id}, admitted for observation."),
    ("en", "Traveler details: passport no. {passport}, nationality CN, seat 32A."),
    ("en", "The staging DB lives at {ip}; prod is behind the bastion at {ip}."),
    ("en", "Summarize this ticket: customer {email} reports the app crashes on startup."),
    ("en", "Contact: Ms. Li, mobile {mobile}, prefers WeChat."),
    ("en", "Can you check why card {card} was declined at the POS?"),
    ("en", "Firewall log: DENY tcp {ip}:51432 -> {ip}:22"),
    ("en", "Employee onboarding form - ID card: {id}, salary account: {card}."),
    ("en", "Forward the invoice to {email_obf} please, thanks!"),
    ("en", "Passport number: {passport_ctx} (US), expires 2029-08-01."),
    ("en", "User reported high latency from {ip6} to our edge nodes."),
    ("en", "Call me back at {mobile} after 6pm."),
    ("en", "My Visa {card} exp 09/27 keeps getting rejected."),
    ("en", "Loan application: applicant ID {id}, phone {mobile}, requested amount CNY 200,000."),
    ("en", 'nginx access log: {ip} - - [12/Mar/2024:10:15:32 +0800] "GET /api/v1/users HTTP/1.1" 200 512'),
    ("en", "Send the signed NDA to {email} and cc legal."),
    ("en", "Hotel guest: passport {passport}, check-in 2024-06-01, room 1208."),
    ("en", "Please update my billing card to {card}."),
    ("en", 'Why does this time out?\n```python\nDB_HOST = "{ip}"\nDB_USER = "app"\n```'),
    ("en", "```yaml\nsmtp:\n  user: {email}\n  host: smtp.example.com\n```"),
    ("mixed", 'test_user = {"name": "张三", "id_no": "{id}", "phone": "{mobile}"}'),
    ("en", "INSERT INTO customers (name, card_no) VALUES ('Li Na', '{card}');"),
    ("en", "curl -H 'X-Forwarded-For: {ip}' https://api.example.com/health"),
    ("mixed", 'logger.info("sms sent to %s", "{mobile}")  # 这行为什么打印了两次'),
    ("en", "2024-03-15 10:23:45 WARN login failed user={email} ip={ip}"),
    ("en", '{"traveler": {"name": "WANG FANG", "passport": "{passport}"}}'),
    ("mixed", "ssh admin@{ip} -p 2222 连不上，提示 connection refused"),
    ("en", "ALLOWED_HOSTS = ['{ip6}', 'localhost']"),
    ("mixed", "客户 Tom 的 email 是 {email}，请 follow up 一下。"),
    ("mixed", "麻烦 check 一下 IP {ip} 是不是被 ban 了。"),
    ("mixed", "这个 user 的 phone 是 {mobile}，ID number {id}。"),
    ("mixed", "Card number 卡号：{card}，CVV 别发给我！"),
    ("mixed", "Passport 护照：{passport}，visa 还没下来。"),
    ("en", "The attacker IP {ip} hit /wp-login.php 4,000 times last night."),
    ("en", "Per KYC, attach a scan of the passport ({passport}) and proof of address."),
    ("en", "Chargeback dispute for card {card}: merchant says goods were delivered."),
    ("en", "Please verify identity: resident ID {id}, mobile {mobile}."),
    ("en", "Reply to {email_obf} for the beta invite."),
    ("en", "Our office egress IP is {ip}, please whitelist it."),
    ("en", "Recipient: Chen Hao, {mobile}, Room 502, Building 3."),
    ("en", "Debit card {card} was charged twice for the same order."),
    ("en", "Applicant passport: {passport}. Please don't store this in the CRM notes."),
    ("en", "Error: SMTP auth failed for {email} (535 Authentication credentials invalid)"),
    ("en", "Translate to Chinese: 'Dear customer, your card {card} has been activated.'"),
    ("en", "Draft a reply to {email} apologizing for the delayed shipment."),
    ("en", "The VPN client keeps assigning {ip} even after I renew the lease."),
    ("mixed", "帮我 debug：requests.get('http://{ip}:8080/api') 一直 timeout"),
]

NEGATIVE: list[tuple[str, str]] = [
    ("zh", "您的订单号 {luhn_order} 已发货，预计 3 天内送达。"),
    ("zh", "运单号：SF{digits13}，请在顺丰官网查询物流。"),
    ("zh", "发票号码 {digits8}，发票代码 {digits12}，金额 ¥1,299.00。"),
    ("zh", "订单 {order18} 已取消，退款将在 1-3 个工作日原路返回。"),
    ("zh", "系统版本 v1.2.3.4 已发布，修复了登录问题。"),
    ("zh", "请把固件升级到 2.4.1.0 之后再测试。"),
    ("zh", "客服热线 400-820-8820，工作日 9:00-18:00。"),
    ("zh", "中国移动客服 10086，中国联通 10010。"),
    ("zh", "北京时间 2024-03-15 14:22:09，服务器开始维护。"),
    ("zh", "商品编号 {sku}，库存 128 件，单价 ¥59.90。"),
    ("zh", "工单 #{digits6} 已关闭，处理人：运维组。"),
    ("zh", "流水号 {luhn_order}，交易金额 500.00 元。"),
    ("zh", "这款手机型号是 Mate 60 Pro，内存 12GB+512GB。"),
    ("zh", "公司座机 010-6234 5678，传真 010-6234 5679。"),
    ("zh", "邮编 100086，地址：北京市海淀区中关村大街 1 号。"),
    ("zh", "会议定在 2024年3月15日 下午 3 点，会议室 1208。"),
    ("zh", "身份证号格式为 18 位，最后一位可能是 X，请注意校验。"),
    ("zh", "测试用的身份证号 {bad_id} 校验位不对，系统提示无效。"),
    ("zh", "卡号 {bad_card} 校验失败（Luhn 不通过），请重新输入。"),
    ("zh", "快递单号 {luhn_order} 显示已签收，但我没收到。"),
    ("zh", "发票 {luhn_order} 的抬头写错了，需要重开。"),
    ("zh", "Git 提交 {sha1} 引入了这个 bug。"),
    ("zh", "文件 SHA256：{sha256}"),
    ("zh", "请求 ID：{uuid}，请附在工单里。"),
    ("zh", "价格从 ¥4,199 降到 ¥3,899，优惠 300 元。"),
    ("zh", "12306 提示候补订单已兑现，车次 G1234，08车12F。"),
    ("zh", "京沪高速 G2 和 G15 今天有雨，注意安全。"),
    ("zh", "工号 {nonmobile11} 的员工本月打卡 22 天。"),
    ("zh", "手机号必须是 11 位，以 1 开头，例如 1XX-XXXX-XXXX。"),
    ("zh", "时间戳 {ts} 对应的是哪一天？"),
    ("zh", "毫秒时间戳 {ts_ms} 转成日期是多少？"),
    ("zh", "IP 白名单格式示例：x.x.x.x，每行一个。"),
    ("zh", "本地调试请访问 http://127.0.0.1:8000 或 http://localhost:3000。"),
    ("zh", "监听地址设为 0.0.0.0，端口 8080。"),
    ("zh", "子网掩码 255.255.255.0，DNS 自动获取。"),
    ("zh", "第 3.2.1.4 条规定了数据分级的具体要求。"),
    ("zh", "护照办理需要 7 个工作日，加急 3 天。"),
    ("zh", "请准备护照原件、两寸照片和在职证明。"),
    ("zh", "价格表：A 套餐 ¥199/月，B 套餐 ¥299/月。"),
    ("zh", "账单周期为每月 5 日至次月 4 日。"),
    ("zh", "批次号 {luhn_order} 的药品已全部召回。"),
    ("zh", "条码 {ean13}，请扫码入库。"),
    ("zh", "ISBN {isbn13}，人民邮电出版社出版。"),
    ("zh", "我们的 QQ 群号是 {digits9}，欢迎加入讨论。"),
    ("zh", "车牌号京A·12345的车辆本月违章 2 次。"),
    ("zh", "体温 36.5℃，血压 120/80 mmHg，心率 72 次/分。"),
    ("zh", "请拨打 021-5432 1234 转 8001。"),
    ("zh", "报销单 {order16} 已审批通过，请查收。"),
    ("zh", "VIN 码 LSVAU2180N2183294 的车辆保养记录在哪里查？"),
    ("zh", "请在 15 分钟内完成支付，超时订单自动取消。"),
    ("zh", "手机号 {digits9}0 少了一位，请重新输入。"),
    ("zh", "客户留的电话 12812345678 是空号，无法联系。"),
    ("zh", "统一社会信用代码：{uscc}"),
    ("zh", "银行客服电话 95588，信用卡中心 400-669-5588。"),
    ("zh", "部署脚本里用的是 root@localhost，别改。"),
    ("zh", "@张三 @李四 请今天下班前提交周报。"),
    ("zh", "本季度营收 1,234,567.89 元，同比增长 12.5%。"),
    ("zh", "身份证丢了怎么补办？需要带什么材料？"),
    ("zh", "银行卡年费怎么免？信用卡一年要刷几次？"),
    ("zh", "帮我写一个校验手机号格式的正则表达式。"),
    ("en", "Your order #{luhn_order} has shipped via UPS."),
    ("en", "Tracking number {ups} - estimated delivery Friday."),
    ("en", "Invoice INV-2024-{digits6} is due on April 30."),
    ("en", "Upgrade to version 1.2.3.4 to fix CVE-2024-12345."),
    ("en", "Build 10.0.19045.3570 of Windows is affected."),
    ("en", "Released v2.3.1.0 with improved logging."),
    ("en", "The dotted string 1.2.3.4.5 is not an IP address."),
    ("en", "Listen on 127.0.0.1:8080 for local testing."),
    ("en", "Set bind_address = 0.0.0.0 in the config."),
    ("en", "Commit {sha1} broke the CI pipeline."),
    ("en", "Session {uuid} expired after 30 minutes."),
    ("en", "The price went from $4,199.99 to $3,899.00."),
    ("en", "Meeting at 10:30, room 4B, bring the Q3 report."),
    ("en", "Call our toll-free line 1-800-555-0199 for support."),
    ("en", "Order total: 3 items, SKU 884213-00-BLK, subtotal $120.50."),
    ("en", "Employee number {nonmobile11} completed the security training."),
    ("en", "Timestamp {ts_ms} corresponds to a date in 2024."),
    ("en", "Card numbers must pass the Luhn check; {bad_card} does not."),
    ("en", "The ID {bad_id} fails the checksum, so the form rejects it."),
    ("en", "Contact support via the in-app chat or email us at the address on your invoice."),
    ("en", "Follow @seekserve on social media for updates."),
    ("en", "Use the @Override annotation when implementing the interface."),
    ("en", "Look at example.com for the documentation."),
    ("en", "In C++, std::vector<int>::iterator is a random-access iterator."),
    ("en", "Python slicing like a[::2] returns every second element."),
    ("en", "Office hours 08:00:00-17:30:00, Monday to Friday."),
    ("en", "Passport photo requirements: 33mm x 48mm, white background."),
    ("en", "Your passport application is being processed; expect 10 business days."),
    ("en", "Model G7-3590 ships with a 15.6-inch display."),
    ("en", "Product code E1234567 is discontinued."),
    ("en", "Error code 0x80070005: access denied."),
    ("en", "Latitude 39.9042, longitude 116.4074."),
    ("en", "Flight CA1831 departs at 07:35 from T3."),
    ("en", "Your verification code is 482913, valid for 5 minutes."),
    ("en", "Ticket {luhn_order} has been escalated to tier 2."),
    ("en", "Account balance: $12,450.33 as of 2024-03-31."),
    ("en", "ISBN 978-7-115-42802-8 is the second edition."),
    ("en", "Tracking ID {luhn_order} - out for delivery."),
    ("en", "Shipment {luhn_order} cleared customs this morning."),
    ("en", "Invoice #{luhn_order} was paid in full."),
    ("en", "Reference {luhn_order}: refund processed."),
    ("en", "Range check: 256.1.1.1 is invalid because 256 > 255."),
    ("en", "UUID v4 example: {uuid}."),
    ("en", "AWS instance metadata lives at 169.254.169.254."),
    ("en", "User-Agent: Mozilla/5.0 Chrome/120.0.6099.109 Safari/537.36"),
    ("en", "Docker image tag 3.11.7-slim-bookworm is the one we pin."),
    ("en", "How do I validate a credit card number with the Luhn algorithm in Go?"),
    ("en", "What is the format of a Chinese resident identity card number?"),
    ("mixed", "这个 bug 在 v2.1.0.5 里修了，你 upgrade 一下。"),
    ("mixed", "订单 order #{luhn_order} 还没发货，催一下 logistics。"),
    ("mixed", "Sprint 23 的 story points 一共 48 点。"),
    ("mixed", "请把 timeout 从 30s 改成 60s，retry 3 次。"),
    ("mixed", "SKU 编号 {sku} 缺货，补货周期 2 周。"),
    ("en", "```python\nfor i in range(10):\n    print(i ** 2)\n```"),
    ("en", "SELECT * FROM orders WHERE order_id = {luhn_order};"),
    ("en", "const PORT = process.env.PORT || 3000;"),
    ("en", "digest = hashlib.sha256(b'hello').hexdigest()  # {sha256}"),
    ("en", "docker run -p 127.0.0.1:5432:5432 postgres:16"),
    ("en", "CREATE TABLE users (id BIGINT PRIMARY KEY, phone VARCHAR(11), id_card CHAR(18));"),
    ("en", "assert luhn('4111111111111112') is False"),
    ("en", "version: '3.8'\nservices:\n  web:\n    image: nginx:1.25"),
    ("en", '{"order_id": "{luhn_order}", "status": "paid"}'),
    ("en", "2024-03-15T10:23:45.123Z INFO request_id={uuid} latency=123ms"),
    ("en", "npm install @types/node@20 --save-dev"),
    ("en", "pip install requests==2.31.0 'urllib3<2'"),
]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def render(rng: random.Random, template: str) -> tuple[str, list[str]]:
    kinds: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in PII:
            kind, make = PII[name]
            kinds.append(kind)
            return make(rng)
        if name in NOT_PII:
            return NOT_PII[name](rng)
        return m.group()   # literal braces (JSON, code)

    return _PLACEHOLDER.sub(fill, template), sorted(set(kinds))


def main() -> None:
    rng = random.Random(SEED)
    items = []
    for templates, extra in ((POSITIVE, 59), (NEGATIVE, 45)):
        chosen = list(templates) + rng.sample(list(templates), extra)
        for lang, template in chosen:
            text, kinds = render(rng, template)
            items.append({"text": text, "lang": lang, "pii": bool(kinds), "kinds": kinds})
    rng.shuffle(items)
    OUT.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    pos = sum(item["pii"] for item in items)
    print(f"wrote {len(items)} items ({pos} with PII, {len(items) - pos} without) to {OUT}")


if __name__ == "__main__":
    main()
