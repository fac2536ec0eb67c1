"""De-identification of free text before a dataset leaves a member: detect, then pseudonymise or remove.

Detection is rule-based on purpose: a member can read every rule, the rules run without a model
or network, and `bench/deid_eval.py` measures them on a labelled set through the very same
`scan()` that releases use. Rules favour recall over precision (a missed phone number leaks, a
masked torque value only costs a little data), and overlapping detections are merged so that no
half of an identifier survives.

Pseudonyms are a keyed HMAC-SHA256 of (kind, normalised value) with the member's secret: the same
asset stays the same asset across records and releases of that member, another member (another
secret) cannot link or reverse them. The report of a release names kinds, counts and locations,
never values, because it is written into a shared manifest.
"""
from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import hmac
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from indai.platform.config import Strict
from indai.platform.errors import UserError

Kind = Literal["person", "phone", "email", "rrn", "brn", "company", "address", "serial", "part"]
# Order is the tie-break of overlapping detections of equal length: the more specific kind first.
KINDS: tuple[str, ...] = ("email", "rrn", "brn", "phone", "serial", "part", "company", "address", "person")
_PRIORITY = {k: i for i, k in enumerate(KINDS)}
MAX_SHIFT_DAYS = 3650
MAX_PATTERN_CHARS = 500
MIN_SECRET_BYTES = 16
MAX_PASSES = 4


# ----------------------------------------------------------------------------------------------
# Configuration


class DeidConfig(Strict):
    """What one member de-identifies and how. Patterns are that member's own serial/part formats."""

    mode: Literal["pseudonymise", "remove"] = "pseudonymise"
    kinds: list[Kind] = Field(default_factory=lambda: list(KINDS))
    member_names: list[str] = Field(default_factory=list)
    customer_names: list[str] = Field(default_factory=list)
    person_names: list[str] = Field(default_factory=list)
    serial_patterns: list[str] = Field(default_factory=list)
    part_patterns: list[str] = Field(default_factory=list)
    time_shift_days: int = Field(0, ge=-MAX_SHIFT_DAYS, le=MAX_SHIFT_DAYS)
    pseudonym_hex: int = Field(8, ge=6, le=32)
    max_report_locations: int = Field(20, ge=0, le=1000)

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("kinds must name at least one kind (" + ", ".join(KINDS) + "); "
                             "to release without de-identification, do not run this step")
        return list(dict.fromkeys(v))

    @field_validator("member_names", "customer_names", "person_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            name = " ".join(str(name).split())
            if len(name) < 2:
                raise ValueError(f"name {name!r} is shorter than 2 characters and would match everywhere: remove it")
            out.append(name)
        return out

    @field_validator("serial_patterns", "part_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            _check_pattern(p)
        return v


def _check_pattern(p: str) -> re.Pattern:
    if not isinstance(p, str) or not p:
        raise ValueError("a pattern must be a non-empty regular expression")
    if len(p) > MAX_PATTERN_CHARS:
        raise ValueError(f"pattern {p[:40]!r}... is longer than {MAX_PATTERN_CHARS} characters")
    try:
        rx = re.compile(p)
    except re.error as e:
        raise ValueError(f"pattern {p!r} is not a valid regular expression ({e}); "
                         "check brackets and escape literal dots and dashes") from None
    # A pattern that can match nothing would 'find' an identifier between every two characters.
    for probe in ("", " ", "a", "A1", "0", "-", "가", "x y"):
        if any(m.end() == m.start() for m in rx.finditer(probe)):
            raise ValueError(f"pattern {p!r} can match the empty string: use + instead of * or ? so it needs at least one character")
    return rx


# ----------------------------------------------------------------------------------------------
# Detection rules

_H = "가-힣"
_UNITS = (r"(?:mm|cm|km|m\b|µm|um|kg|g\b|t\b|ton|Nm|N\b|kN|MPa|GPa|bar|psi|°|℃|%|V\b|kV|A\b|mA|Hz|kHz|"
          r"kW|W\b|rpm|RPM|h\b|hr|min|ms|s\b|sec|L\b|ml|ea|EA|pcs|개|회|시간|분|초|일|대|건|톤|매|번|도)")
_NOUNIT = rf"(?!\s?{_UNITS})"
_LB = r"(?<![A-Za-z0-9_+\-./])"   # number starts: not glued to a word, a sign, a dash or a dot
_RB = r"(?![A-Za-z0-9_\-]|\.\d)"

_PHONE_RULES = [
    # Korean mobile: 010-1234-5678, 010 1234 5678, 01012345678
    rf"{_LB}01[016789](?:[-. ]?\d{{3,4}}[-. ]?\d{{4}}){_RB}{_NOUNIT}",
    # +82 10-1234-5678, +82-2-123-4567, +82 (0)31 ...
    rf"(?<![\w+])\+\s?82[-. ]?(?:\(0\)[-. ]?)?0?(?:1[016789]|2|[3-6][1-5]|70|50\d?)[-. )]?\d{{3,4}}[-. ]?\d{{4}}{_RB}",
    # Korean landline and VoIP: 02-123-4567, 031-1234-5678, (055) 234-5678, 070-1234-5678
    rf"{_LB}(?:\(0(?:2|[3-6][1-5]|70|50\d?)\)\s?|0(?:2|[3-6][1-5]|70|50\d?)[-. ])\d{{3,4}}[-. ]\d{{4}}{_RB}{_NOUNIT}",
    # Representative numbers: 1588-1234, 1577-0000, 1644-...
    rf"{_LB}1(?:5[4-9]|6[0-9]|8[0-9])\d-\d{{4}}{_RB}{_NOUNIT}",
    # International, not Korea: +49 711 1234 5678, +1 (248) 555-0142, +86-21-5555-1234
    r"(?<![\w+])\+(?!\s?82)[1-9]\d{0,2}(?:[-. ]?\(\d{1,4}\))?(?:[-. ]?\d{1,5}){2,5}(?!\d)",
    # North-American style without country code: (248) 555-0142
    r"(?<![\w(])\(\d{3}\)\s?\d{3}[-. ]\d{4}(?!\d)",
]
_PHONE_LABEL = re.compile(
    r"(?i:tel|phone|fax|mobile|mob|cell|hp|h\.p|h/p|call)\.?\s*(?:no\.?|number|#)?\s*[:：]?\s*"
    r"|(?:전화|연락처|휴대폰|핸드폰|휴대전화|팩스|직통|대표번호)\s*(?:번호)?\s*[:：]?\s*")
_PHONE_AFTER_LABEL = re.compile(r"\+?\(?\d[\d\-. ()]{6,18}\d(?!\d)")

_EMAIL = (r"(?<![\w.+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?"
          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w\-])")

_YYMMDD = r"\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
_RRN_RULES = [
    rf"{_LB}{_YYMMDD}\s?[-–]\s?[1-4](?:\d{{6}}|\d\*{{5}}|\*{{6}}){_RB}",
    rf"{_LB}{_YYMMDD}[1-4]\d{{6}}{_RB}{_NOUNIT}",
]
_BRN_RULES = [rf"{_LB}\d{{3}}-\d{{2}}-\d{{5}}{_RB}{_NOUNIT}"]
_BRN_LABEL = re.compile(r"(?:사업자\s?(?:등록)?\s?번호|(?i:BRN|business\s+reg(?:istration|\.)?\s*(?:no\.?|number|#)))"
                        r"\s*[:：]?\s*(\d{3}-?\d{2}-?\d{5})(?!\d)")

# -- companies
_KO_LEGAL = r"(?:주식회사|유한회사|\(주\)|\(유\)|㈜)"
_KO_WORD = rf"[{_H}A-Za-z0-9&·]"
_EN_LEGAL = (r"(?:Co\.?,?\s?Ltd\.?|Company\s+Limited|Company|Co\.|Ltd\.?|Limited|Inc\.?|Incorporated|Corp\.?|Corporation|"
             r"GmbH(?:\s?&\s?Co\.?\s?KG)?|LLC|L\.L\.C\.|plc|S\.A\.|S\.p\.A\.|B\.V\.|N\.V\.|"
             r"Pte\.?\s?Ltd\.?|Pvt\.?\s?Ltd\.?|K\.K\.|Sdn\.?\s?Bhd\.?|Industries)")
_EN_CAPW = r"[A-Z][A-Za-z0-9&'\-]*"
# PLC, AG and KG are also a programmable logic controller, an agitator and kilograms in shop-floor
# text ("REPLACE PLC CARD"): as legal forms they count only after a name written in mixed case.
_EN_MIXW = r"[A-Z][a-z][A-Za-z0-9&'\-]*"
_COMPANY_RULES = [
    rf"(?<![A-Za-z0-9&'\-]){_EN_CAPW}(?:\s+{_EN_CAPW}){{0,3}},?\s+{_EN_LEGAL}(?![A-Za-z])",
    rf"(?<![A-Za-z0-9&'\-]){_EN_MIXW}(?:\s+{_EN_CAPW}){{0,3}},?\s+(?:PLC|AG|KG)(?![A-Za-z])",
]
_KO_SECTOR = ("정밀|산업|금속|전자|화학|테크|텍|중공업|기공|엔지니어링|소재|케미칼|철강|제강|제철|물산|기계|시스템|솔루션|"
              "모터스|오토|메탈|공업|산전|전기|정공|하이텍|플라스틱|실업|통상|상사|건설|조선|해운|물류|반도체|"
              "디스플레이|에너지|인더스트리|코리아|로지스|기연|기전|특수강|강관|주철|주강|단조|도금|도장|이엔지|이앤씨")
_KO_COMPANY_CTX = re.compile(
    rf"(?:협력사|협력업체|업체|공급사|공급업체|납품업체|납품처|고객사|거래처|외주사|외주업체|하청|하도급사|벤더|제조사|시공사|발주처|원청)"
    rf"\s?(?:인|은|의)?\s?[:：]?\s?((?<![{_H}])[{_H}A-Za-z0-9]{{1,10}}(?:{_KO_SECTOR}))")
_EN_SECTOR = (r"(?:Precision|Metal|Metals|Steel|Industries|Industrial|Electronics|Electric|Chemical|Chemicals|Tech|Technologies|"
              r"Engineering|Motors|Systems|Materials|Automotive|Logistics|Shipbuilding|Semiconductor|Machinery|Plastics|"
              r"Coatings|Castings|Forging|Fasteners|Components|Solutions|Heavy Industries|Hydraulics|Robotics|Bearings)")
_EN_COMPANY_CTX = re.compile(
    rf"(?i:supplier|vendor|customer|client|subcontractor|contractor|manufacturer|maker|carrier)s?\s*[:,]?\s+"
    rf"((?:{_EN_CAPW}\s+){{0,2}}{_EN_SECTOR})\b")

# -- addresses
_KO_PROV = ("(?:서울|부산|대구|인천|광주|대전|울산|세종|제주|경기|강원|충북|충남|전북|전남|경북|경남|"
            "충청북|충청남|전라북|전라남|경상북|경상남)(?:특별자치시|특별자치도|특별시|광역시|도|시)?")
_KO_ADMIN = rf"[{_H}]{{1,6}}(?:시|군|구)"
_KO_SUB = rf"[{_H}0-9]{{1,8}}(?:읍|면|동|리|가)"
_KO_NUM = r"\d{1,5}(?:-\d{1,5})?"
_KO_ROAD = rf"[{_H}0-9·]{{1,12}}(?:대로|로|길)\s?{_KO_NUM}(?:\s?번?길\s?{_KO_NUM})?(?![\d\-])"
_KO_LOT = rf"{_KO_SUB}\s?(?:산\s?)?{_KO_NUM}(?:\s?번지)?(?![\d\-])"
_KO_ADDR_TAIL = rf"(?:,?\s?(?:[A-Za-z0-9{_H}]{{1,6}}동\s?)?\d{{1,4}}(?:층|호)(?:\s?\d{{1,4}}호)?)?(?:\s?\([{_H}0-9]{{1,8}}(?:동|읍|면|리|가)(?:,\s?[{_H}0-9]{{1,10}})?\))?"
_EN_ST = (r"(?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Boulevard|Blvd\.?|Lane|Ln\.?|Parkway|Pkwy\.?|Highway|Hwy\.?|"
          r"Drive|Dr\.?|Way|Court|Ct\.?|Place|Pl\.?|Circle|Terrace|Trail|Pike|Route)")
_EN_ADDR_TAIL = (r"(?:,?\s+(?:Suite|Ste\.?|Unit|Bldg\.?|Building|Floor|Fl\.?|#)\s*[A-Z0-9\-]{1,6})?"
                 r"(?:,\s*[A-Z][A-Za-z.\-]*(?:\s+[A-Z][A-Za-z.\-]*){0,2}){0,3}(?:,?\s+[A-Z]{2}\s+\d{5}(?:-\d{4})?|,?\s+\d{5}(?:-\d{4})?)?")
_ROM_ADMIN = r"[A-Z][a-z]+(?:-[a-z0-9]+)*-(?:gu|si|gun|do|dong|eup|myeon|ri)\b"
_ADDRESS_RULES = [
    rf"(?<![{_H}])(?:{_KO_PROV}|{_KO_ADMIN})(?:\s+(?:{_KO_ADMIN}|{_KO_SUB}))*\s+(?:{_KO_ROAD}|{_KO_LOT}){_KO_ADDR_TAIL}",
    rf"(?<![\w\-])\d{{1,6}}[A-Z]?\s+(?:[NSEW]\.?\s+)?(?:[A-Z][A-Za-z0-9']*\s+){{1,4}}{_EN_ST}(?![A-Za-z]){_EN_ADDR_TAIL}",
    # romanised Korean: 45 Gongdan-ro, Seongsan-gu, Changwon-si / Gongdan-ro 123beon-gil 4
    rf"(?<![\w\-])(?:\d{{1,5}}(?:-\d{{1,4}})?,?\s+)?[A-Z][a-z]+(?:-[a-z0-9]+)*-(?:ro|gil|daero)\b(?:\s?\d{{1,5}}(?:-\d{{1,4}})?(?:beon-gil\s?\d{{1,4}})?)?"
    rf"(?:,?\s*{_ROM_ADMIN})*(?:,\s*[A-Z][a-z]+(?:-[a-z]+)*(?=\s*(?:[-,.;)]|$)))?",
    rf"(?<![\w\-])(?:{_ROM_ADMIN},?\s+){{2,}}[A-Z][a-z]+(?:-[a-z0-9]+)*-(?:ro|gil|daero)\b\s?\d{{1,5}}(?:-\d{{1,4}})?",
    # German style: Industriestraße 12, 70565 Stuttgart
    r"(?<![\w\-])(?:[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|allee|platz|ring|damm|gasse)|(?:[A-ZÄÖÜ][a-zäöüß]+-)+"
    r"(?:Straße|Strasse|Str\.|Weg|Allee|Platz|Ring|Damm|Gasse))\s\d{1,4}[a-z]?(?:,?\s*(?:D-)?\d{5}\s[A-ZÄÖÜ][a-zäöüß]+)?",
]

# -- serial and part numbers: a label followed by a code that holds a digit
_CODE = r"([A-Za-z0-9][A-Za-z0-9\-/.]{2,30}[A-Za-z0-9])"
_SERIAL_LABEL = re.compile(
    r"(?<![A-Za-z])(?:(?i:s/n|s\.n\.|sn|serial(?:\s?(?:no\.?|number|#))?|asset\s?(?:no\.?|tag|#|id)|equipment\s?(?:no\.?|id)|machine\s?id)"
    r"|시리얼\s?(?:번호|넘버)?|제조\s?번호|일련\s?번호|기기\s?번호|장비\s?번호|설비\s?번호|자산\s?번호|관리\s?번호|호기\s?번호)"
    rf"\s*[:#.\-]?\s*{_CODE}")
_PART_LABEL = re.compile(
    r"(?<![A-Za-z])(?:(?i:p/n|pn|part\s?(?:no\.?|number|#)|item\s?(?:no\.?|code)|material\s?(?:no\.?|code)|dwg\.?\s?no\.?|drawing\s?(?:no\.?|number))"
    r"|품번|부품\s?번호|품목\s?코드|자재\s?코드|자재\s?번호|도번|도면\s?번호)"
    rf"\s*[:#.\-]?\s*{_CODE}")

# -- people
_KO_SURNAMES = ("남궁|황보|제갈|선우|독고|사공|서문|"
                "김|이|박|최|정|강|조|윤|장|임|한|오|서|신|권|황|안|송|전|홍|유|고|문|양|손|배|백|허|남|심|노|하|곽|성|차|주|"
                "우|구|민|류|나|진|지|엄|채|원|천|방|공|현|함|변|염|여|추|도|소|석|선|설|마|길|연|위|표|명|기|반|왕|금|옥|육|"
                "인|맹|제|모|탁|국|어|은|편|용|예|경|봉|사|부|가|복|태|목|형|피|두|감|음|빈|동|온|호|범|좌|팽|승|간|상|시|갈|단|견|당")
_KO_TITLES = ("책임연구원|선임연구원|수석연구원|주임연구원|연구원|공장장|본부장|그룹장|파트장|팀장|반장|조장|직장|계장|과장|대리|"
              "부장|차장|주임|사원|기사|대표|책임|선임|수석|실장|소장|이사|상무|전무|사장|매니저|엔지니어|프로|님|씨|선생")
_KO_LABELS = ("담당자|담당|작업자|점검자|작성자|작성|확인자|확인|보고자|승인자|승인|검사자|검사원|요청자|수신자|수신|발신자|발신|참조|성명|이름|"
              "정비자|정비원|운전원|조작자|입회자|입회|인수자|인계자|인수|인계|교대자|책임자|관리자|감독자|처리자|조치자|발견자|신고자|"
              "문의|연락|기안자|기안|결재|검토자|검토|측정자|시험자|배정|지정|대표이사|대표자|대표")
# Labels that are also everyday verbal nouns ("인계 예정", "확인 필요") need a colon before a name.
_KO_WEAK_LABELS = frozenset("작성 확인 승인 입회 인수 인계 문의 연락 기안 결재 검토 배정 지정 수신 발신 참조 담당".split())
_KO_PARTICLE = "(?:께서|에게|한테|이|가|은|는|을|를|의|와|과|도|님|씨|께)"
_KO_NAME = rf"(?<![{_H}A-Za-z0-9])(?:{_KO_SURNAMES})[{_H}]{{1,2}}"
_KO_PERSON_TITLE = re.compile(rf"({_KO_NAME})(?=\s?\(?\s?(?:{_KO_TITLES}))")
_KO_PERSON_LABEL = re.compile(rf"(?<![{_H}])({_KO_LABELS})\s?([:：]?)\s?({_KO_NAME})(?={_KO_PARTICLE}?(?![{_H}]))")
_KO_PERSON_PHONE_LEFT = re.compile(rf"({_KO_NAME})\s?[(/,:]?\s?$")
_KO_PERSON_GROUP = re.compile(rf"({_KO_NAME})(?=\s?(?:외|등)\s?\d+\s?(?:명|인))")
_KO_LIST_LEFT = re.compile(rf"({_KO_NAME})(?:,|·|/|와|과|및|、)\s?$")
_KO_LIST_RIGHT = re.compile(rf"^(?:님|씨)?\s?(?:,|·|/|및|、)\s?({_KO_NAME})(?={_KO_PARTICLE}?(?![{_H}]))")
# Words that look like surname + given name before a title but name a trade, a shift or a place.
_KO_NOT_NAMES = frozenset("""
정비 설비 전기 기계 도장 조립 용접 안전 공정 공무 구매 현장 제조 제어 주조 정련 제강 제선 도금 조선 선박 전자 성형 연구
선임 책임 수석 전임 주임 오전 오후 주간 주야 전일 금일 당일 익일 전체 전원 이번 이전 이후 이상 이하 기존 신규 신입 고객 협력
공급 외주 구조 배관 배선 계장 계측 임시 임원 방재 환경 설계 기술 기획 노무 인사 총무 하역 선적 변전 송전 전력 우리 당사 본사
지사 남부 서부 동부 경영 경리 유지 원료 원가 공장 공사 공용 공구 모듈 모델 표준 표면 방문 금형 사출 진동 진공 인증 경비 석유
선별 선반 연마 연삭 변압 여과 마감 위생 위험 차량 차체 소재 소방 소성 천장 천정 방청 지게 지게차 기중기 전기실 조립라인 정비실
현장소 현장대 반장 조장 과장 부장 차장 대리 사원 기사 대표 실장 소장 이사 상무 전무 사장 부사장 전임자 후임 후임자 전임
신호 신호수 유도 유도원 보조 보조원 운전 운반 운송 도색 도료 주물 단조 압연 열처 열처리 가공 가공기 검사 시험 시공 감리
구동 구역 구간 지원 지원팀 지역 주요 주변 주야간 장비 장치 고장 고압 고온 저압 정기 정밀 정상 정량 기능 기준 기록 기타
한국 한전 국내 국외 해외 해당 상기 상부 하부 좌측 우측 전면 후면 측면 내부 외부 여유 예비 예방 보수 보전 보고 보안 부품
부서 부장님 소속 공정별 도장부 도장팀 설비팀 정비팀 조립팀 제조팀 전기팀 안전팀 구매팀 기술팀 공무팀 생산팀 품질팀
예정 사업자 사업장 사무실 사용자 사용 신청 신청자 요청 공지 주의 조치 처리 완료 진행 보류 대기 교체 교대 점검 정리 정지 해제 사례 상품 번호 이메일 메일 주소
""".split())
_KO_ROLE_WORDS = frozenset(_KO_TITLES.split("|") + _KO_LABELS.split("|") + "전화 연락처 휴대폰 핸드폰 팩스 번호 전화번호 대표전화".split())
_KO_BAD_LAST = frozenset("팀부실과반조측사동층처단")

_EN_TOK = r"(?:Mc|Mac|O')?[A-ZÀ-ÖØ-Þ][a-zß-öø-ÿ]+(?:-[A-Za-z][a-zß-öø-ÿ]+)?"
_EN_INIT = r"[A-Z]\.\s?"
_EN_NAME1 = rf"(?:{_EN_INIT}){{0,2}}{_EN_TOK}(?:\s+{_EN_TOK}){{0,2}}"      # one token is enough after Mr./Dr.
_EN_NAME2 = rf"(?:{_EN_INIT}){{1,2}}{_EN_TOK}|{_EN_TOK}(?:\s+{_EN_INIT})?(?:\s+{_EN_TOK}){{1,2}}"
_EN_HONORIFIC = re.compile(rf"(?<![A-Za-z])(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Mdm)\.?\s+({_EN_NAME1})")
_EN_ROLES = (r"technicians?|engineers?|operators?|inspectors?|supervisors?|managers?|foreman|foremen|fitters?|welders?|"
             r"electricians?|mechanics?|auditors?|planners?|leads?|leaders?|directors?|chemists?|specialists?|"
             r"coordinators?|representatives?|reps?|agents?|buyers?|officers?|analysts?|contacts?|contact\s+person|"
             r"colleagues?|drivers?|assistants?|apprentices?|trainees?|worker|workers|staff|employees?")
_EN_CTX = (rf"(?i:{_EN_ROLES}|by|contact|call|phone|ring|email|e-mail|ping|text|visitor|visitors|host|guest|attendees?|participants?|present|witness|witnesses|attn|attention|dear|hi|hello|regards|thanks|thank\s+you|sincerely|cheers|cc|from|to|"
           r"signed|sign-off|approved|reported|checked|inspected|prepared|requested|assigned|handled|witnessed|called|"
           r"ask|asked|tell|told|inform|informed|notify|notified|with|per|name|owner|author|reviewer|approver|requester|"
           r"reporter|inspector|assignee|recipient|sender|operator)")
_EN_PERSON_CTX = re.compile(rf"(?<![A-Za-z]){_EN_CTX}\s*[:,\-]?\s+(?:(?:the|our|your|their|senior|junior|chief|lead|head|shift|night|day|QA|QC|"
                            rf"field|site|service|maintenance|quality|process|production|safety|electrical|mechanical)\s+)*"
                            rf"({_EN_NAME2})")
_EN_PERSON_ROLE_AFTER = re.compile(rf"(?<![A-Za-z.])({_EN_NAME2})\s*(?:[,(]|-|–)\s*(?:(?:our|the|a|an|senior|junior|chief|lead|head|shift|"
                                   rf"[A-Za-z/&]{{2,12}})\s+){{0,3}}(?:{_EN_ROLES}|manager|QA|QC)\b")
_EN_GREETING = re.compile(r"(?<![A-Za-z])(?i:hi|hello|dear|thanks|thank\s+you|cheers|regards)\s*,?\s+([A-Z][a-z]+)(?=\s*[,!:;.])")
# "Escalation: I. Nelson (", "Visitor log: Tomasz L. Reed,": a heading, a colon, then a name set off by punctuation;
# headings nest ("Work order: Visitor log: Tomasz L. Reed,"), so one may follow another's colon
_EN_PERSON_HEADING = re.compile(rf"(?:^|(?<=[.;:!?\n]\s)|(?<=\n))[A-Z][a-z]+(?:\s[a-z]+)?:\s+({_EN_NAME2})(?=\s*[,(<;])")
_EN_PERSON_PHONE_LEFT = re.compile(rf"(?<![A-Za-z.])({_EN_NAME2})\s?[(/,:]?\s?(?:(?i:tel|phone|mobile|cell|on|at)\.?:?\s)?$")
_EN_PERSON_VERB = re.compile(rf"(?<![A-Za-z.])({_EN_NAME2})(?=\s+(?:will|would|has|had|is|was|replaced|noticed|reported|confirmed|"
                            r"checked|said|called|asked|approved|requested|found|fixed|repaired|inspected|signed|wrote|sent|"
                            r"completed|logged|attended|joined|left|visited|returned|agreed|observed|measured|recorded)\b)")
_EN_PERSON_KO_LABEL = re.compile(rf"(?:{_KO_LABELS}|{_KO_TITLES})\s?[:：]?\s?({_EN_NAME2})")
_EN_LIST_RIGHT = re.compile(rf"^\s*(?:,|and|&|/)\s*(?:and\s+)?({_EN_NAME2})")
_KR_ROMAN_SURNAMES = ("Kim|Lee|Yi|Rhee|Park|Pak|Choi|Choe|Jung|Jeong|Chung|Kang|Cho|Jo|Yoon|Yun|Jang|Chang|Lim|Im|Han|Oh|Seo|Suh|Shin|Sin|"
                      "Kwon|Hwang|Ahn|An|Song|Yoo|Yu|Ryu|Hong|Jeon|Jun|Ko|Koh|Go|Moon|Mun|Yang|Son|Sohn|Bae|Baek|Paik|Heo|Hur|Nam|"
                      "Shim|Sim|Noh|Roh|Ha|Kwak|Sung|Seong|Cha|Joo|Ju|Woo|Koo|Gu|Min|Na|Jin|Ji|Eom|Um|Chae|Won|Cheon|Chun|Bang|"
                      "Kong|Gong|Hyun|Ham|Byun|Yeom|Yeo|Choo|Do|Seok|Sun|Sul|Ma|Gil|Yeon|Wi|Pyo|Myung|Ki|Ban|Wang|Geum|Ok|Yook|"
                      "In|Maeng|Je|Mo|Tak|Kook|Eo|Eun|Pyeon|Yong|Ye|Kyung|Bong|Namgung|Hwangbo|Jegal|Seonwoo|Sunwoo|Dokgo")
# Romanised Korean names carry a hyphenated or two-syllable given name: "Kim Min-su", "Min-su Kim", "Park Jihoon".
_EN_KOREAN_NAME = re.compile(
    rf"(?<![A-Za-z\-])(?:(?:{_KR_ROMAN_SURNAMES})\s+[A-Z][a-z]+-[A-Za-z][a-z]+|[A-Z][a-z]+-[A-Za-z][a-z]+\s+(?:{_KR_ROMAN_SURNAMES}))(?![A-Za-z\-])")
_ROM_SYL = (r"(?:kk|tt|pp|ss|jj|ch|k|g|n|d|t|r|l|m|b|p|s|j|h|y|w)?"
            r"(?:yeo|yae|wae|wa|wo|we|wi|ui|eo|ae|oe|eu|ee|oo|ou|ya|ye|yo|yu|a|e|i|o|u)(?:ng|n|m|l|k|p|t)?")
_ROM_GIVEN = re.compile(rf"[A-Z](?:{_ROM_SYL}){{2}}", re.IGNORECASE)
_ROM_SURNAME = re.compile(rf"(?:{_KR_ROMAN_SURNAMES})")
_EN_FIRST_NAMES = frozenset("""
James John Robert Michael William David Richard Joseph Thomas Charles Christopher Daniel Matthew Anthony Mark Donald Steven Paul
Andrew Joshua Kenneth Kevin Brian George Timothy Ronald Edward Jason Jeffrey Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry
Justin Scott Brandon Benjamin Samuel Gregory Alexander Frank Patrick Raymond Dennis Jerry Tyler Aaron Jose Adam Nathan Henry
Douglas Zachary Peter Kyle Ethan Walter Noah Jeremy Christian Keith Roger Terry Gerald Harold Sean Austin Carl Arthur Lawrence
Dylan Jesse Jordan Bryan Billy Joe Bruce Gabriel Logan Albert Willie Alan Juan Wayne Elijah Randy Roy Vincent Ralph Eugene Russell
Bobby Mason Philip Louis Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty Margaret Sandra
Ashley Kimberly Emily Donna Michelle Carol Amanda Dorothy Melissa Deborah Stephanie Rebecca Sharon Laura Cynthia Kathleen Amy Angela
Shirley Anna Brenda Pamela Emma Nicole Helen Samantha Katherine Christine Debra Rachel Carolyn Janet Catherine Maria Heather Diane
Ruth Julie Olivia Joyce Virginia Victoria Kelly Lauren Christina Joan Evelyn Judith Megan Andrea Cheryl Hannah Jacqueline Martha
Gloria Teresa Ann Sara Madison Frances Kathryn Janice Jean Abigail Alice Judy Sophia Denise Amber Doris Marilyn Danielle
Beverly Isabella Theresa Diana Natalie Brittany Charlotte Marie Kayla Alexis Lori Hans Klaus Jürgen Stefan Wolfgang Andreas Markus
Thomas Tobias Lukas Felix Jan Anja Katrin Sabine Julia Monika Petra Ingrid Pierre Jean Luc François Marco Luca Giulia Carlos Miguel
Ana Wei Li Hiroshi Takeshi Kenji Yuki Haruto Akira Raj Arjun Priya Anil Sunil Vikram Chen Mei Ling Ivan Olga Dmitri Lars Erik Nils
Sven Mats Ahmed Omar Fatima Ali Tom Tim Ben Sam Dan Mike Chris Steve Jim Bob Rob Nick Alex Matt Jeff Greg Tony Ken Kate Liz Jen
Sue Meg Beth Jim Jenny Rick Ron Don Hugh Neil Ian Owen Colin Graham Stuart Martin Simon Oliver Harry Jacob Leo Emil Hugo
""".split())
_EN_STOP = frozenset("""
The This That These Those Our Your Their His Her Its A An And Or Of For To From By With At In On Per Via As If Please Thanks
Thank Regards Best Dear Hello Hi Team All Sir Madam Mr Mrs Ms Dr Quality Control Assurance Line Shift Plant Maintenance
Department Dept Production Engineering Manager Operator Technician Engineer Supervisor Inspector Safety Night Day Morning
Evening Afternoon Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August
September October November December Section Unit Press Robot Furnace Mill Building Station Zone Area Cell Bay Dock Yard Block
Shop Warehouse Office Service Support Customer Supplier Vendor Purchasing Logistics Sales Group Division Center Centre North
South East West Main New Old Korea Korean Steel Metal Metals Precision Industries Industrial Electronics Electric Chemical
Chemicals Motors Motor Systems System Tech Technology Technologies Materials Automotive Heavy Shipbuilding Co Ltd Inc Corp
Corporation GmbH Company QA QC Report Note Notes Work Order Request Issue Lot Batch Part Serial Drawing Rev Revision Spec
Standard Pump Valve Bearing Gearbox Conveyor Compressor Boiler Crane Hoist Welding Paint Painting Assembly Stamping Casting
Forging Coating Inspection Test Lab Laboratory Root Cause Action Corrective Preventive Final Incoming Outgoing First Article
Material Process Site Field Lead Head Chief Senior Junior Shipping Receiving Planning Procurement Operations Management
Committee Board Review Audit Project Program Cooling Tower Water Hot Cold Rolling Blast Oven Kiln Reactor Tank Hull Dry Body
Frame Chassis Engine Module Battery Panel Sensor Controller Drive Emergency Stop Alarm Error Fault Check Confirmed Replaced
Repaired Completed Pending Open Closed Done Status Update Next Last Today Tomorrow Yesterday Week Month Year Teams Crew Staff
Contact Contacts Name Owner Author Approver Reviewer Assignee Attn Attention Cc Re Fw Fwd Subject Sent Received Seal Gasket
Bolt Nut Shaft Pipe Hose Filter Oil Grease Coolant Tool Tools Die Mold Mould Jig Fixture Welder Weld Line1 Hyundai Samsung
Posco Kia Mobis Doosan Hanwha Lotte Seoul Busan Ulsan Changwon Pohang Incheon Gwangyang Geoje Dangjin Asan Cheonan Gumi Suwon
Daegu Daejeon Gwangju China Japan Germany USA America Europe Asia Vietnam India Mexico Poland Stuttgart Munich Detroit
Chicago Texas Ohio Michigan Road Street Avenue Way Route Highway Port English German Chinese Japanese Electrical Mechanical
Hydraulic Pneumatic Robotics Tooling Utility Utilities Hydraulics Coatings Castings Automation Fasteners Machinery Plastics
Components Solutions Bearings Forgings
""".split())


# Words that introduce a company name but are not part of it ("Contact Daesung Co., Ltd.").
_EN_LEADING = frozenset("The Our Your Their This That Contact From To By Supplier Vendor Customer Client Attn Dear Please Per Re "
                        "Fw Fwd Cc Subject Sender Via And Call Email Ship Meeting Invoice Quote Dear Hi Hello Thanks Regards".split())


@dataclass(frozen=True)
class Finding:
    """One detected identifier: its kind and where it is in the text (the value is never kept)."""

    kind: str
    start: int
    end: int


_TOKEN_RX = re.compile(r"\[(?:" + "|".join(k.upper() for k in KINDS) + r")(?:_[0-9a-f]{6,32})?\]")
_KO_TRAILING = ("에서는", "에서도", "으로부터", "로부터", "에서", "에게", "으로", "과의", "와의", "께서", "로", "의", "은", "는",
                "을", "를", "에", "와", "과", "도", "측")


_KO_LEGAL_RX = re.compile(_KO_LEGAL)
_KO_WORD_LEFT = re.compile(rf"(?<![{_H}A-Za-z0-9&·])({_KO_WORD}{{2,20}})(\s?)$")
_KO_WORD_RIGHT = re.compile(rf"^(\s?)({_KO_WORD}{{1,20}})")
_KO_SECTOR_END = re.compile(rf"(?:{_KO_SECTOR})$")


def _ko_legal_companies(s: str) -> list[tuple[str, int, int]]:
    """'주식회사 X', 'X 주식회사', '(주)X', 'X(주)': the legal form belongs to the word it is glued to.

    When both neighbours are equally close, a word that ends like a company ('정밀', '산업') wins,
    then the word after (the usual written order), unless that word is followed by a title.
    """
    out = []
    for m in _KO_LEGAL_RX.finditer(s):
        left = _KO_WORD_LEFT.search(s[max(0, m.start() - 22):m.start()])
        right = _KO_WORD_RIGHT.match(s[m.end():m.end() + 22])
        cands = []
        if left:
            w = left.group(1)
            cands.append((len(left.group(2)), 0 if _KO_SECTOR_END.search(w) else 1, 1, m.start() - len(left.group(0)), m.end()))
        if right:
            w = right.group(2)
            stem = w
            for p in _KO_TRAILING:
                if stem.endswith(p) and len(stem) - len(p) >= 2:
                    stem = stem[:-len(p)]
                    break
            titled = re.match(rf"\s?(?:{_KO_TITLES})", s[m.end() + len(right.group(0)):])
            cands.append((len(right.group(1)), 0 if _KO_SECTOR_END.search(stem) else 1, 2 if titled else 0,
                          m.start(), m.end() + len(right.group(0))))
        if cands:
            best = min(cands)
            out.append(("company", best[3], best[4]))
        else:
            out.append(("company", m.start(), m.end()))
    return out


class _Detector:
    """The compiled rules of one configuration; `scan` is the only entry point."""

    def __init__(self, cfg: DeidConfig) -> None:
        self.kinds = frozenset(cfg.kinds)
        c = re.compile
        self.simple: list[tuple[str, re.Pattern]] = []
        for kind, rules in (("phone", _PHONE_RULES), ("email", [_EMAIL]), ("rrn", _RRN_RULES), ("brn", _BRN_RULES),
                            ("company", _COMPANY_RULES), ("address", _ADDRESS_RULES)):
            self.simple += [(kind, c(r)) for r in rules]
        self.simple += [("serial", c(p)) for p in cfg.serial_patterns]
        self.simple += [("part", c(p)) for p in cfg.part_patterns]
        self.lists: list[tuple[str, re.Pattern]] = []
        for kind, names in (("company", cfg.member_names + cfg.customer_names), ("person", cfg.person_names)):
            for name in sorted(set(names), key=len, reverse=True):
                body = r"\s+".join(re.escape(w) for w in name.split())
                if re.search(r"[A-Za-z0-9]", name[0]) and re.search(r"[A-Za-z0-9]", name[-1]):
                    rx = c(rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])", re.IGNORECASE)
                else:
                    rx = c(rf"(?<![{_H}A-Za-z0-9]){body}", re.IGNORECASE)
                self.lists.append((kind, rx))

    # -- candidates

    def _candidates(self, s: str) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        for kind, rx in self.simple + self.lists:
            for m in rx.finditer(s):
                if m.end() > m.start():
                    out.append((kind, m.start(), m.end()))
        for m in _PHONE_LABEL.finditer(s):
            n = _PHONE_AFTER_LABEL.match(s, m.end())
            if n:
                out.append(("phone", n.start(), n.end()))
        for rx, kind in ((_BRN_LABEL, "brn"), (_SERIAL_LABEL, "serial"), (_PART_LABEL, "part"),
                         (_KO_COMPANY_CTX, "company"), (_EN_COMPANY_CTX, "company")):
            for m in rx.finditer(s):
                if kind in ("serial", "part") and not any(ch.isdigit() for ch in m.group(1)):
                    continue
                if kind == "company" and rx is _EN_COMPANY_CTX and m.group(1).split()[0] in ("The", "Our", "Your", "Their", "This", "That"):
                    continue
                out.append((kind, m.start(1), m.end(1)))
        out += _ko_legal_companies(s)
        out = [self._trim_company(s, f) if f[0] == "company" else f for f in out]
        out = [f for f in out if f[0] != "phone" or sum(ch.isdigit() for ch in s[f[1]:f[2]]) >= 8]
        out += self._people(s, [f for f in out if f[0] == "phone"])
        return [f for f in out if f[2] > f[1]]

    @staticmethod
    def _trim_company(s: str, f: tuple[str, int, int]) -> tuple[str, int, int]:
        kind, a, b = f
        # English: drop leading words that are not part of a name ("Contact Daesung Co., Ltd.").
        while True:
            m = re.match(r"([A-Za-z]+)\s+(?=\S)", s[a:b])
            if not m or m.group(1) not in _EN_LEADING:
                break
            a += m.end()
        # Korean: a particle glued to the name is not part of it ("(주)대한정밀에서").
        for p in _KO_TRAILING:
            if s[a:b].endswith(p) and b - a - len(p) >= 4 and re.match(rf"[{_H}]", s[b - len(p) - 1]):
                b -= len(p)
                break
        return kind, a, b

    def _people(self, s: str, phones: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []

        def ko_ok(a: int, b: int) -> bool:
            w = s[a:b]
            if w in _KO_NOT_NAMES or w in _KO_ROLE_WORDS or w[-1] in _KO_BAD_LAST:
                return False
            return True

        for rx in (_KO_PERSON_TITLE, _KO_PERSON_GROUP):
            for m in rx.finditer(s):
                if ko_ok(m.start(1), m.end(1)):
                    out.append(("person", m.start(1), m.end(1)))
        for m in _KO_PERSON_LABEL.finditer(s):
            if (m.group(2) or m.group(1) not in _KO_WEAK_LABELS) and ko_ok(m.start(3), m.end(3)):
                out.append(("person", m.start(3), m.end(3)))
        for ph in phones:
            m = _KO_PERSON_PHONE_LEFT.search(s[max(0, ph[1] - 12):ph[1]])
            if m:
                off = max(0, ph[1] - 12)
                if ko_ok(off + m.start(1), off + m.end(1)):
                    out.append(("person", off + m.start(1), off + m.end(1)))

        def en_ok(a: int, b: int, strict: bool) -> tuple[int, int] | None:
            toks = list(re.finditer(r"[A-Za-z'\-]+\.?", s[a:b]))
            words = [t.group().rstrip(".") for t in toks]
            # trim trailing stop words ("John Smith Monday")
            while words and words[-1] in _EN_STOP:
                words.pop()
                toks.pop()
            if not words or any(w in _EN_STOP for w in words if len(w) > 1):
                return None
            if strict and len([w for w in words if len(w) > 1]) < 2 and not re.match(r"[A-Z]\.", s[a:b]):
                return None
            return a, a + toks[-1].end() - (1 if toks[-1].group().endswith(".") and len(toks[-1].group()) > 2 else 0)

        for ph in phones:
            m = _EN_PERSON_PHONE_LEFT.search(s[max(0, ph[1] - 40):ph[1]])
            if m:
                off = max(0, ph[1] - 40)
                span = en_ok(off + m.start(1), off + m.end(1), True)
                if span:
                    out.append(("person", *span))
        for rx, strict in ((_EN_HONORIFIC, False), (_EN_PERSON_CTX, True), (_EN_PERSON_ROLE_AFTER, True), (_EN_PERSON_HEADING, True),
                           (_EN_PERSON_VERB, True), (_EN_PERSON_KO_LABEL, True)):
            for m in rx.finditer(s):
                span = en_ok(m.start(1), m.end(1), strict)
                if span:
                    out.append(("person", *span))
        for m in _EN_GREETING.finditer(s):
            if m.group(1) not in _EN_STOP:
                out.append(("person", m.start(1), m.end(1)))
        for m in _EN_KOREAN_NAME.finditer(s):
            out.append(("person", m.start(), m.end()))
        for m in re.finditer(rf"(?<![A-Za-z])({_EN_TOK})\s+((?:{_EN_INIT})?{_EN_TOK})(?![A-Za-z])", s):
            if m.group(1) in _EN_FIRST_NAMES and m.group(2) not in _EN_STOP and m.group(2) not in _EN_FIRST_NAMES:
                out.append(("person", m.start(), m.end()))
            elif m.group(1) in _EN_FIRST_NAMES and m.group(2) in _EN_FIRST_NAMES and m.group(2) not in _EN_STOP:
                out.append(("person", m.start(), m.end()))
            elif m.group(1) not in _EN_STOP and m.group(2) not in _EN_STOP and (
                    (_ROM_SURNAME.fullmatch(m.group(1)) and _ROM_GIVEN.fullmatch(m.group(2)))
                    or (_ROM_SURNAME.fullmatch(m.group(2)) and _ROM_GIVEN.fullmatch(m.group(1)))):
                # "Minsu Kim", "Park Jihoon": a two-syllable romanised given name next to a Korean surname
                out.append(("person", m.start(), m.end()))
        # Lists: "김민수, 이영희 대리", "작업자: 김민수, 박지훈", "technicians John Smith and Mark Lee".
        seen = set(out)
        frontier = list(out)
        while frontier:
            _, a, b = frontier.pop()
            new = []
            if re.match(rf"[{_H}]", s[a]):
                m = _KO_LIST_LEFT.search(s[max(0, a - 12):a])
                if m:
                    off = max(0, a - 12)
                    new.append(("person", off + m.start(1), off + m.end(1)))
                m = _KO_LIST_RIGHT.match(s[b:b + 16])
                if m:
                    new.append(("person", b + m.start(1), b + m.end(1)))
            else:
                m = _EN_LIST_RIGHT.match(s[b:b + 60])
                if m:
                    span = en_ok(b + m.start(1), b + m.end(1), True)
                    if span:
                        new.append(("person", *span))
            for f in new:
                if f not in seen and (not re.match(rf"[{_H}]", s[f[1]]) or ko_ok(f[1], f[2])):
                    seen.add(f)
                    out.append(f)
                    frontier.append(f)
        return out

    # -- resolution

    def scan(self, s: str) -> list[Finding]:
        if not isinstance(s, str):
            raise UserError(f"de-identification takes text, not {type(s).__name__}")
        # Pseudonyms already in the text are never detected again (text() is idempotent).
        tokens = [(m.start(), m.end()) for m in _TOKEN_RX.finditer(s)]
        starts = [t[0] for t in tokens]

        def in_token(a: int, b: int) -> bool:
            i = bisect.bisect_left(starts, b) - 1   # the last token starting before b
            return i >= 0 and tokens[i][1] > a

        cands = [f for f in self._candidates(s) if f[0] in self.kinds and not in_token(f[1], f[2])]
        # Overlapping detections become one span (their union), so that no part of an identifier
        # is left in the text; its kind is that of the longest detection, then the kind priority.
        out: list[Finding] = []
        group: list[tuple[str, int, int]] = []
        end = -1
        for f in sorted(cands, key=lambda f: (f[1], f[2])) + [("", 1 << 62, 1 << 62)]:
            if group and f[1] >= end:
                kind = min(group, key=lambda g: (-(g[2] - g[1]), _PRIORITY[g[0]], g[1]))[0]
                out.append(Finding(kind, group[0][1], end))
                group = []
            group.append(f)
            end = f[2] if len(group) == 1 else max(end, f[2])
        return out


@lru_cache(maxsize=16)
def _detector(config_json: str) -> _Detector:
    return _Detector(DeidConfig.model_validate_json(config_json))


def scan(s: str, config: DeidConfig | None = None) -> list[Finding]:
    """Identifiers in `s`, sorted by position and not overlapping. Release and evaluation both call this."""
    return _detector((config or DeidConfig()).model_dump_json()).scan(s)


# ----------------------------------------------------------------------------------------------
# Pseudonymisation

_KO_COMPANY_WORDS = re.compile(r"주식회사|유한회사|\(주\)|\(유\)|㈜")
_EN_COMPANY_WORDS = re.compile(r"(?i)\b(?:co\.?,?\s?ltd\.?|company\s+limited|company|co\.|ltd\.?|limited|inc\.?|incorporated|corp\.?|"
                               r"corporation|gmbh(?:\s?&\s?co\.?\s?kg)?|ag|kg|llc|l\.l\.c\.|plc|s\.a\.|s\.p\.a\.|b\.v\.|n\.v\.|"
                               r"pte\.?\s?ltd\.?|pvt\.?\s?ltd\.?|k\.k\.|sdn\.?\s?bhd\.?)(?![a-z])")


def normalise(kind: str, value: str) -> str:
    """The form two mentions of one identifier share, so that they get one pseudonym."""
    v = " ".join(value.split())
    if kind in ("phone",):
        d = re.sub(r"\D", "", v.replace("(0)", ""))
        if d.startswith("82"):
            d = "0" + d[2:].lstrip("0")
        return d
    if kind in ("rrn", "brn"):
        return re.sub(r"[^\d*]", "", v)
    if kind == "email":
        return v.lower()
    if kind == "company":
        v = _KO_COMPANY_WORDS.sub("", v)
        v = _EN_COMPANY_WORDS.sub("", v)
        return re.sub(r"[\s,.&'·\-]", "", v).casefold()
    if kind in ("serial", "part"):
        return re.sub(r"[\s]", "", v).upper()
    if kind == "person":
        return re.sub(r"[\s.\-]", "", v).casefold()
    return re.sub(r"[\s,]", "", v).casefold()


class Deidentifier:
    """De-identifies the texts of one member's release and remembers what it found for the report."""

    def __init__(self, config: DeidConfig, secret: bytes) -> None:
        if not isinstance(config, DeidConfig):
            raise UserError("Deidentifier needs a DeidConfig (load it with indai.platform.config.load_config)")
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
            raise UserError(f"the member's de-identification secret must be at least {MIN_SECRET_BYTES} bytes; "
                            "generate one with `python -c 'import secrets; print(secrets.token_hex(32))'` and keep it with the member")
        self.config = config
        self._secret = bytes(secret)
        self._detector = _detector(config.model_dump_json())
        self._counts: dict[str, int] = {k: 0 for k in config.kinds}
        self._where: dict[str, dict[str, None]] = {k: {} for k in config.kinds}
        self._where_extra: dict[str, int] = {k: 0 for k in config.kinds}
        self._texts = 0
        self._texts_with_findings = 0
        self._shifted = 0

    def scan(self, s: str) -> list[Finding]:
        return self._detector.scan(s)

    def pseudonym(self, kind: str, value: str) -> str:
        if self.config.mode == "remove":
            return f"[{kind.upper()}]"
        msg = f"{kind}\x00{normalise(kind, value)}".encode("utf-8")
        digest = hmac.new(self._secret, msg, hashlib.sha256).hexdigest()
        return f"[{kind.upper()}_{digest[:self.config.pseudonym_hex]}]"

    def text(self, s: str, where: str) -> str:
        """`s` with every identifier replaced; `where` (e.g. "train/record 12/text") goes into the report."""
        if not isinstance(s, str):
            raise UserError(f"de-identification takes text, not {type(s).__name__} (at {self._safe_where(where)})")
        self._texts += 1
        found = False
        # An identifier glued to another one ("123-45-67890Kim Min-su") only has a word boundary once
        # its neighbour is replaced, so scan again until nothing is left (which also makes text() idempotent).
        for _ in range(MAX_PASSES):
            findings = self.scan(s)
            if not findings:
                break
            found = True
            parts, pos = [], 0
            for f in findings:
                parts += [s[pos:f.start], self.pseudonym(f.kind, s[f.start:f.end])]
                pos = f.end
                self._note(f.kind, where)
            parts.append(s[pos:])
            s = "".join(parts)
        self._texts_with_findings += found
        return s

    def _note(self, kind: str, where: str) -> None:
        self._counts[kind] += 1
        places = self._where[kind]
        if where in places:
            return
        if len(places) < self.config.max_report_locations:
            places[where] = None
        else:
            self._where_extra[kind] += 1

    def _safe_where(self, where: str) -> str:
        # `where` is the caller's text; it must not carry an identifier into the manifest either.
        w = str(where)[:200]
        for f in reversed(self._detector.scan(w)):
            w = w[:f.start] + f"[{f.kind.upper()}]" + w[f.end:]
        return w

    def shift_time(self, ts: Any) -> Any:
        """`ts` moved by the member's `time_shift_days`, in the type it came in (datetime, date, numpy, ISO text)."""
        days = self.config.time_shift_days
        out = _shift(ts, days)
        self._shifted += 1
        return out

    def report(self) -> dict[str, Any]:
        """What was found, by kind and where: counts and locations, never values (it goes into a shared manifest)."""
        return {
            "mode": self.config.mode,
            "kinds_enabled": list(self.config.kinds),
            "texts": self._texts,
            "texts_with_findings": self._texts_with_findings,
            "total": sum(self._counts.values()),
            "by_kind": {k: n for k, n in self._counts.items()},
            "where": {k: [self._safe_where(w) for w in places] for k, places in self._where.items() if places},
            "where_not_listed": {k: n for k, n in self._where_extra.items() if n},
            "timestamps_shifted": self._shifted,
        }


def _shift(ts: Any, days: int) -> Any:
    if isinstance(ts, np.datetime64) or (isinstance(ts, np.ndarray) and ts.dtype.kind == "M"):
        unit = np.datetime_data(ts.dtype)[0]
        if unit in ("Y", "M", "W", "generic"):
            ts = ts.astype("datetime64[D]")
        return ts + np.timedelta64(days, "D")
    if isinstance(ts, _dt.datetime) or isinstance(ts, _dt.date):
        return ts + _dt.timedelta(days=days)
    if isinstance(ts, str):
        text = ts.strip()
        try:
            if len(text) == 10:
                return (_dt.date.fromisoformat(text) + _dt.timedelta(days=days)).isoformat()
            parsed = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise UserError(f"timestamp {ts[:40]!r} is not ISO 8601 (e.g. 2024-03-15 or 2024-03-15T08:30:00+09:00)") from None
        sep = " " if len(text) > 10 and text[10] == " " else "T"
        out = (parsed + _dt.timedelta(days=days)).isoformat(sep=sep)
        return out[:-6] + "Z" if text.endswith("Z") and out.endswith("+00:00") else out
    raise UserError(f"cannot shift a {type(ts).__name__}: give a datetime, a date, a numpy datetime64 or an ISO 8601 string")
