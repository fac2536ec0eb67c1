"""Build the constructed de-identification evaluation set (bench/data/deid_eval.jsonl).

Every sentence is made here from hand-written templates of plant paperwork (shift logs, work
orders, QA reports, supplier e-mails) and random fillers; no record comes from a real plant and
every name, number and address is invented. The identifiers are planted, so their spans are known
exactly. About a fifth of the sentences hold no identifier but look-alikes (dates, torque ranges,
error codes, bare part-like codes, trades before a title) so that precision means something.

Held-out check: templates marked `held_out` are only used when seed != 0, and every filler is drawn
from the seed, so `--seed 1` gives sentences the rules were not tuned on.

    .venv/bin/python bench/make_deid_eval.py            # writes bench/data/deid_eval.jsonl (seed 0)
    .venv/bin/python bench/make_deid_eval.py --seed 1 --out /tmp/deid_seed1.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "deid_eval.jsonl"
N_PER_LANG = 180
NEG_SHARE = 0.2

# Which kind each placeholder plants; placeholders not listed are harmless fillers.
KIND_OF = {
    "pko": "person", "pen": "person", "pkr": "person", "pen_last": "person", "pen_first": "person",
    "mob": "phone", "land": "phone", "rep": "phone", "intl": "phone", "mob_intl": "phone", "land_intl": "phone",
    "email": "email", "rrn": "rrn", "brn": "brn", "brn_raw": "brn",
    "cko": "company", "cen": "company", "member": "company", "customer": "company", "cctx": "company", "cctx_en": "company",
    "ako": "address", "aen": "address", "aen_kr": "address", "aen_de": "address",
    "serial": "serial", "mser": "serial", "part": "part", "mpart": "part",
}

# ---------------------------------------------------------------------------------------------
# Templates: (text, held_out). {x|이가} picks the Korean particle that fits the value's last syllable.

KO = [
    ("{date} 야간조 {pko} 반장이 2번 압연기 롤 베어링 이상음 확인, {pko} 과장({mob})에게 보고함.", False),
    ("열연공장 가열로 버너 점검 결과 이상 없음. 작성자: {pko}", False),
    ("{cko} {pko} 대리 방문, 사출기 금형 교체 일정 협의. 연락처 {mob}", False),
    ("고객사 {customer} 품질팀 클레임 접수: 도어 패널 스크래치 12건. 담당 {pko} 책임", False),
    ("프레스 3호기 S/N: {serial} 유압 실린더 누유, 협력사 {cctx}에 수리 의뢰함.", False),
    ("{cko} 납품 부품 품번 {part} 치수 불량(공차 ±0.05 초과), 반품 요청. 담당자 {pko} ({land})", False),
    ("용접 로봇 티칭 변경 후 비드 불량 감소. 확인: {pko} 선임, {pko} 주임", False),
    ("협력사 세금계산서 확인 요청: 사업자등록번호 {brn}, 대표 {pko}", False),
    ("신규 입사자 {pko} 사원 안전교육 이수, 주민등록번호 {rrn} 인사팀 전달 완료", False),
    ("{ako} 소재 {cko} 공장 실사 예정 ({date})", False),
    ("선박 블록 도장 두께 측정 결과 기준 미달 구간 발견, {pko} 반장에게 재작업 지시", False),
    ("냉각수 펌프 교체 완료. 제조번호 {serial}, 설치 업체 {cko}", False),
    ("{pko} 팀장님 요청으로 {member} 포항공장 고로 출선구 점검 일정 변경", False),
    ("반도체 장비사 {cko} 엔지니어 {pko} 씨 내방, 챔버 PM 진행 (문의 {email})", False),
    ("클린룸 파티클 초과 알람, 설비번호 {mser} 가동 중지. 보고자 {pko}", False),
    ("자재 입고 검사: {mpart} 수량 500EA, 외관 양호. 검사자 {pko}", False),
    ("반응기 온도 편차 발생, 운전원 {pko|이가} 수동 조치 후 {pko} 과장에게 인계", False),
    ("협력업체 {cko} 출입 신청: {pko} 외 2명, 안전교육 {date} 이수", False),
    ("{customer} 요청 사양 변경(도면번호 {part}) 반영 완료, {pko} 책임연구원 검토", False),
    ("배송지: {ako}, 수령인 {pko} ({mob})", False),
    ("A/S 접수 {rep}, 고객 {pko}님 냉각팬 소음 문의", False),
    ("크레인 와이어로프 교체, 작업자 {pko}, {pko}, 입회 {pko} 대리", False),
    ("{date} 주간 근무일지: 전기실 {pko} 기사, 변압기 절연저항 측정 정상", False),
    ("{cko} 영업 담당 {pko} 과장 메일 {email}, 전화 {land}", False),
    ("외주 도장 업체 {cko} 사업자번호 {brn} 등록 완료", False),
    ("{member} 광양 제철소 {pko} 부장님께 시험성적서 송부", False),
    ("불량 시료 회수처: {ako} {cko} 품질관리팀", False),
    ("본사 주소 변경 안내: {ako} (대표전화 {land})", False),
    ("시리얼 번호 {serial} 모터 과열로 소손, 제조사 {cctx}에 원인 분석 요청", False),
    ("{pko} 연구원이 조선소 용접부 UT 검사 결과 보고서 작성", False),
    ("긴급 연락망: {pko} 반장 {mob}, {pko} 조장 {mob}", False),
    ("LOT 240315-02 출하 보류, {customer} {pko} 대리와 협의 중", False),
    ("인수인계: 인계자 {pko}, 인수자 {pko}, 특이사항 없음", False),
    ("{pko}씨가 교대 전 지게차 일상점검 누락, 재교육 실시", False),
    ("설비 이력카드: 관리번호 {serial}, 최초 설치 {date}, 설치사 {cko}", False),
    ("해외 공급사 담당자 {pen} ({intl}) 통화, 부품 선적 지연 통보", False),
    ("{cen}에서 보낸 교체용 PCB 수령, P/N {part}", False),
    ("개인정보 포함 문서 폐기 대상: 성명 {pko}, 주민번호 {rrn}", False),
    ("{pko} 선임({email}) 작성 FMEA 검토 요청", False),
    ("사내 협력사 {cko} 현장대리인 {pko} 소장, 연락처 {mob}", False),
    ("가스 누출 감지 시 방재센터 {land} 또는 {pko} 차장 {mob}로 연락", False),
    ("{customer} 향 수출 물량 선적 완료, 담당 {pko} 매니저", False),
    ("반품 자재는 {ako} 물류센터로 반송 처리", False),
    ("품질 이상 통보서 수신: 발신 {cko} 품질보증팀 {pko} 부장", False),
    ("정기보수 기간 중 {cko} 인원 15명 투입, 현장 책임자 {pko}", False),
    ("{mser} 스핀들 진동 상승, 베어링 교체 후 {pko} 기사 확인", False),
    ("거래처 {cko} 사업자등록번호 {brn_raw} 변경 통보 접수", False),
    ("오늘 {pko} 주임과 컨베이어 벨트 장력 조정, 내일 {pko} 사원에게 인계 예정", True),
    ("출장 보고: {ako} 소재 고객사 {customer} 방문, {pko} 차장 동행", True),
    ("휴대폰 번호 변경 안내 – {pko} 대리 {mob}", True),
    ("{cko} 대표이사 {pko}, 사업자 {brn}", True),
    ("장비번호 {serial}의 PLC 프로그램 백업은 {pko} 선임연구원이 보관", True),
    ("야간 순찰 중 {pko} 기사가 보일러실 스팀 누설 발견, {mpart} 밸브 교체 필요", True),
]

EN = [
    ("Shift log {date}: bearing noise on roll stand 2 reported by {pen} (ext. 4412), escalated to {pen}.", False),
    ("Please contact {pen} at {email} or {intl} regarding the late shipment of castings.", False),
    ("{cen} confirmed the replacement gearbox, S/N {serial}, will ship on {date}.", False),
    ("Customer complaint from {customer}: paint runs on 14 door panels. Owner: {pen}, QA engineer.", False),
    ("Technician {pen} replaced the hydraulic pump on Press 4; old unit serial no. {serial} returned to {cen}.", False),
    ("Dear Mr. {pen_last}, the PPAP documents for part number {part} are attached. Regards, {pen}", False),
    ("Supplier audit at {aen} scheduled for {date}; auditor {pen}.", False),
    ("Invoice from {cen} (business registration no. {brn}) was rejected by accounting.", False),
    ("Weld defect found on hull block B12, inspector {pkr} requested rework.", False),
    ("Call {pen} on {mob_intl} if the furnace alarm repeats during the night shift.", False),
    ("{pkr} from {member} will visit {customer} on {date} to review the 8D report.", False),
    ("Return the defective sensors ({mpart}) to {aen}, attention {pen}.", False),
    ("Work order WO-24-1187 closed by {pen}; asset tag {mser} back in service.", False),
    ("Cleanroom particle excursion in Bay 3, notified {pen} and {pen}.", False),
    ("New contractor {cen} registered; site supervisor {pen}, phone {land_intl}.", False),
    ("Our Korean plant address is {aen_kr} - please update the shipping label.", False),
    ("Employee record for {pkr} (RRN {rrn}) must not be attached to maintenance tickets.", False),
    ("{cen} field engineer {pen} completed the annual inspection of the overhead crane.", False),
    ("Chemical delivery from {cen} delayed at customs; contact person {pen}, {email}.", False),
    ("The reactor temperature deviation was investigated by Dr. {pen_last} and {pen}.", False),
    ("Spare part request: {mpart} x 4, requested by {pen}, approved by {pen}.", False),
    ("{pen} (maintenance lead) noticed oil mist near the compressor; ticket raised {date} {time}.", False),
    ("Hotline for {customer} warranty claims: {rep}.", False),
    ("Ship samples to {cen}, {aen}, Attn: {pen}.", False),
    ("Battery module line: serial number {serial} failed the insulation test, sent to {pen} for teardown.", False),
    ("Hi {pen_first}, can you check why {cen} invoiced twice? Thanks, {pen}", False),
    ("Minutes: {pkr}, {pen} and {pen} attended the kickoff with {cen}.", False),
    ("Drawing No. {part} rev C released by {pen}, design engineer.", False),
    ("{customer} buyer {pen} asked for a revised quote; her mobile is {mob_intl}.", False),
    ("Forklift collision near Dock 2; witness statements from {pen} and {pkr}.", False),
    ("Install report: robot cell 7, controller S/N: {serial}, integrator {cen}, contact {intl}.", False),
    ("The tank inspection at {aen} was signed off by {pen}, API 653 inspector.", False),
    ("Escalation: {pen} ({email}) needs the CoA for lot 2403-77 by Friday.", False),
    ("{pkr} replaced the mold heater; part no. {part}; 2.5 h downtime.", False),
    ("Visitor log: {pen}, {cen}, arrived 09:10, host {pkr}.", False),
    ("Per {pen}, the {customer} line trial moves to {date}.", False),
    ("Bearing failure analysis sent to {email} and copied to {pen}.", False),
    ("Supplier {cctx_en} shipped the wrong coating thickness; notify {pen}.", False),
    ("For urgent repairs call the {member} maintenance desk at {land}.", False),
    ("Meeting with {cen} at their office, {aen}, on {date}.", False),
    ("Ms. {pen_last} from {cen} confirmed the PO acknowledgment.", False),
    ("{pen}, shift supervisor, approved the lockout for Mill 3 motor replacement.", False),
    ("Electrical panel modified by contractor {cen}; electrician {pen}, license on file.", False),
    ("Sender: {pen} <{email}>, {cen}, {aen_de}.", False),
    ("Vendor master data: {cen}, BRN {brn}, remit to {aen}.", False),
    ("Operator {pkr} logged a coolant leak at {mser}; foreman {pen} isolated the machine.", False),
    ("Thanks to {pen} for staying late to restart the galvanizing line.", True),
    ("{pen} will cover the night shift while {pkr} is on leave.", True),
    ("Return address: {aen}. Phone {intl}.", True),
    ("The robot was commissioned by {cen} engineer {pen} last spring, serial {serial}.", True),
    ("Quote requested from {cen}; their sales rep {pen} can be reached at {mob_intl}.", True),
    ("Note from {pkr}: check torque on the flange bolts (35-45 Nm) before restart.", True),
]

KO_NEG = [
    "{date} 2라인 프레스 금형 교체 완료, 토크 35-45 Nm 기준 체결",
    "에러코드 E-1023 발생 후 리셋, 재발 시 정비팀장에게 보고",
    "도장 반장 지시로 건조로 온도 180℃ 유지, 오전 반장과 교대",
    "판 두께 010 mm 규격 확인, 측정값 10.02 mm",
    "전기 기사 점검 결과 절연저항 500 MΩ 이상으로 양호",
    "회전수 1600-1800 rpm 구간에서 진동 4.5 mm/s 측정",
    "브래킷 BK-2231-A 재고 120개, 다음 주 추가 입고 예정",
    "ISO 9001:2015 내부심사 {date} 실시, 부적합 2건",
    "용접 전류 220-240 A, 전압 24-26 V 조건으로 시험편 제작",
    "설비팀 과장 회의 {time}, 3층 회의실",
    "고로 출선 온도 1,520℃, 슬래그 염기도 1.22",
    "작업지시 WO-2024-0312 완료, 소요시간 3.5시간",
    "SUS304 배관 용접부 PT 검사 합격, M12x1.75 볼트 교체",
    "이번 주 정비 계획: 2호기 기어박스 오일 교환, 5호기 벨트 점검",
    "정기보수 기간 2024.03.15 ~ 2024.03.22, 전 라인 가동 중지",
    "안전 과장 주관 TBM 실시, 참석 인원 23명",
    "반응기 압력 12.5 bar, pH 7.2 유지, 배치 B240315-07",
    "선임 엔지니어 부재로 점검 연기, {date} 재점검",
    "주간 생산량 12,450대, 불량률 0.8%",
    "전원 차단 후 LOTO 실시, 잠금장치 17번 사용",
    "공정 기사 교육 일정은 추후 공지",
    "금형 반장 확인 후 사출 조건 변경 (사출압 85 MPa)",
    "김 과장님 지시로 2호기 점검, 방문자 명단은 경비실 보관",
    "지난주 고장 건은 정비 반장 확인 후 종결",
    "이상 발생 시 주임에게 즉시 보고하고 설비를 정지할 것",
    "오후 조장 교대 시 인수인계 철저, 특이사항 기록",
    "조립라인 대기 시간 15분, 사이클 타임 58초",
]

EN_NEG = [
    "Torque the flange bolts to 35-45 Nm and re-check after 24 h.",
    "Error code E-1023 cleared after PLC reset on {date}.",
    "Checked by the QA team; no findings on Line 3.",
    "Measured gap 010 mm at the drive side, 0.12 mm at the operator side.",
    "Spindle speed 1600-1800 rpm, vibration below 4.5 mm/s.",
    "Bracket BK-2231-A stock is 120 pcs; reorder point 50.",
    "ISO 9001:2015 surveillance audit passed with two minor findings.",
    "The main drive motor of Mill 2 tripped at {time}.",
    "Quality Control approved the first article on {date}.",
    "Technician on night shift reported no abnormalities.",
    "Welding current 220-240 A, voltage 24-26 V, travel speed 35 cm/min.",
    "Reported by Line Manager: conveyor 5 belt misalignment.",
    "Hull block B12 painted with 250 µm DFT, humidity 62%.",
    "Work order WO-24-1187 scheduled for Monday.",
    "Furnace temperature 1,520 °C, tap-to-tap time 52 min.",
    "Replace M12x1.75 bolts (class 10.9) on the pump base.",
    "Batch B240315-07 released after pH 7.2 confirmation.",
    "Contact the Maintenance Department if the alarm repeats.",
    "Press 4 stroke count reached 1,250,000; schedule overhaul in Q3.",
    "SUS304 piping passed PT inspection; report filed on {date}.",
    "Call Safety Office before hot work in Zone C.",
    "Sent to Purchasing for approval by Friday.",
    "Apply Dr. Weld anti-spatter spray before each run.",
    "Lines 3 and 4 were checked by Maintenance Planning.",
    "Contact Customer Service via the portal for warranty forms.",
    "Heat 24A1234 cast on Caster 2, grade S355J2, width 1,850 mm.",
    "Ask the Shift Lead to sign the permit before confined space entry.",
]

# ---------------------------------------------------------------------------------------------
# Fillers

KO_SURNAMES = (["김"] * 10 + ["이"] * 7 + ["박"] * 5 + ["최", "정"] * 3 +
               list("강조윤장임한오서신권황안송류전홍고문양손배백허유남심노하곽성차주우구민진나지엄채원천방공현함변염여추도석선설마길연표명기반왕금옥육인맹제모탁국어은편용예경봉")
               + ["남궁", "황보", "제갈", "선우", "독고"])
KO_G1 = list("민서지현준예도하수영정성동재승은혜유진상태경우종광대윤용철병기주희미소채다나세시연가건규한형창석인명보선아원래남순덕")
KO_G2 = list("수호훈준진민우영희현석철연아은주빈원혁규기환식범경숙자인윤율서하린결찬섭근택일국길남재성구용태")

EN_FIRST = ("James John Robert Michael David Richard Thomas Daniel Matthew Mark Steven Paul Andrew Kevin Brian George Edward "
            "Ryan Eric Scott Peter Nathan Henry Sean Carl Alan Philip Mary Patricia Jennifer Linda Elizabeth Susan Sarah Karen "
            "Lisa Nancy Emily Michelle Laura Rachel Megan Julia Anna Olivia Grace Hannah Chloe Fiona Ingrid Klaus Jürgen Stefan "
            "Tobias Lukas Anja Sabine Pierre Marco Luca Carlos Miguel Hiroshi Kenji Yuki Raj Priya Wei Ling Dmitri Lars Sven "
            "Tom Mike Chris Jim Ben Kate Dave Gareth Declan Siobhan Nadia Rafael Tomasz Agnieszka Quentin Bram Joost Pieter").split()
EN_LAST = ("Smith Johnson Miller Brown Davis Wilson Moore Taylor Anderson Thomas Jackson White Harris Martin Thompson Garcia "
           "Martinez Robinson Clark Lewis Walker Hall Young King Wright Scott Green Baker Adams Nelson Carter Mitchell Roberts "
           "Turner Phillips Campbell Parker Evans Edwards Collins Stewart Morris Murphy Cook Rogers Morgan Cooper Peterson Reed "
           "Bailey Kelly Howard Ward Richardson Watson Brooks Bennett Hughes Price Sanders Foster Schmidt Müller Schneider Fischer "
           "Weber Becker Hoffmann Wagner Nguyen O'Brien McAllister Kowalski Novak Tanaka Suzuki Sato Patel Singh Zhang Wang "
           "Rossi Dubois Lindqvist Okafor Haddad Fernandes Vandenberg Costa").split()
KR_ROM_SUR = "Kim Lee Park Choi Jung Kang Cho Yoon Jang Lim Han Oh Seo Shin Kwon Hwang Ahn Song Yoo Hong Jeon Ko Moon Yang Son Bae Baek Heo Nam Ryu".split()
KR_ROM_SYL = ("min su ji hoon seo yeon hyun woo jun young hee jin ho seok cheol eun ju sang tae kyung dong jae seung hye yu "
              "jung sung won bin hyuk gyu ki hwan sik beom na ra ha rin chan").split()

KO_CO_STEMS = ("대한 한일 동양 세진 성우 태광 신흥 삼화 우진 영신 동진 대성 화신 경신 서연 상신 유진 한솔 대원 범한 진성 명성 신영 "
               "제일 동아 삼원 신성 고려 현성 보광 천일 두성 청우 아진 광진 해성 덕산 새한 한영 대진 극동 서진 남선 우성 평화").split()
KO_CO_SECT = "정밀 산업 금속 전자 화학 테크 중공업 기공 엔지니어링 소재 케미칼 철강 기계 오토텍 정공 하이텍 플라스틱 산전 이엔지 에스티".split()
EN_CO_STEMS = ("Daesung Hanil Dongyang Sejin Seongwoo Taekwang Samhwa Woojin Youngshin Daewon Kyungshin Seoyon Bayline Keystone "
               "Northfield Meridian Crestline Ridgeway Summit Pioneer Kessler Brandt Vogel Harbor Ironbridge Silverlake Redwood "
               "Falcon Orion Atlas Nordwerk Alpen Lakeside Granite Westbrook").split()
EN_CO_SECT = "Precision Metal Industries Electronics Chemical Coatings Castings Hydraulics Automation Fasteners Tooling Systems Engineering Steel Materials".split()
EN_LEGAL = ["Co., Ltd.", "Co., Ltd.", "Inc.", "Corp.", "Corporation", "GmbH", "Ltd.", "LLC", "AG", "Co. Ltd."]

KO_ADDR = [
    (["경상남도", "경남"], ["창원시"], ["성산구", "의창구"], ["공단로", "남면로", "웅남로", "완암로", "창원대로"]),
    (["경상북도", "경북"], ["포항시"], ["남구", "북구"], ["철강로", "호동로", "신항로", "괴동로"]),
    (["울산광역시", "울산"], [""], ["남구", "북구", "울주군", "동구"], ["산업로", "장생포로", "염포로", "온산로", "테크노산업로"]),
    (["경기도", "경기"], ["화성시", "평택시", "시흥시", "이천시"], [""], ["팔탄로", "삼성1로", "산단로", "정왕천로", "마도로"]),
    (["경기도"], ["안산시"], ["단원구"], ["산단로", "해봉로", "목내로"]),
    (["충청남도", "충남"], ["당진시", "아산시", "천안시"], [""], ["송악로", "둔포로", "제2산단로", "서부대로"]),
    (["전라남도", "전남"], ["광양시", "여수시"], [""], ["제철로", "여수산단로", "산단2로"]),
    (["경상남도"], ["거제시"], [""], ["옥포로", "장평로", "거제북로"]),
    (["서울특별시", "서울"], [""], ["금천구", "구로구", "강서구", "영등포구"], ["가산디지털1로", "디지털로", "양천로", "경인로"]),
    (["인천광역시", "인천"], [""], ["남동구", "서구"], ["남동대로", "봉수대로", "청라커낼로"]),
    (["경상북도"], ["구미시"], [""], ["1공단로", "수출대로", "산호대로"]),
]
KO_LOTS = [("경기도 화성시", "팔탄면 가재리"), ("충청남도 아산시", "둔포면 석곡리"), ("충청남도 당진시", "송악읍 고대리"),
           ("울산광역시 울주군", "온산읍 화산리"), ("경기도 평택시", "포승읍 희곡리"), ("경상북도 포항시 남구", "호동"),
           ("서울특별시 금천구", "가산동"), ("경상남도 김해시", "주촌면 농소리"), ("전라북도 군산시", "소룡동")]
EN_STREETS = "Industrial Commerce Harbor Enterprise Technology Maple Oak Lakeside Riverside Mill Foundry Corporate Airport Gateway Innovation".split()
EN_TYPES = ["Street", "Avenue", "Road", "Boulevard", "Parkway", "Drive", "Way", "Pkwy", "Blvd.", "Ave.", "St.", "Rd."]
EN_CITIES = [("Troy", "MI"), ("Spartanburg", "SC"), ("Greenville", "SC"), ("Montgomery", "AL"), ("Chattanooga", "TN"),
             ("Lansing", "MI"), ("Toledo", "OH"), ("Houston", "TX"), ("Fremont", "CA"), ("Marysville", "OH"), ("Georgetown", "KY")]
DE_STREETS = ["Industriestraße", "Hafenstraße", "Werkstraße", "Daimlerstraße", "Robert-Bosch-Straße", "Max-Planck-Straße",
              "Gewerbestraße", "Siemensweg", "Carl-Benz-Allee"]
DE_CITIES = ["Stuttgart", "Wolfsburg", "Ingolstadt", "Duisburg", "Bremen", "Hamburg", "Mannheim", "Dortmund"]
KR_ROM = [("Gongdan-ro", "Seongsan-gu", "Changwon-si", "Gyeongsangnam-do"), ("Cheolgang-ro", "Nam-gu", "Pohang-si", "Gyeongsangbuk-do"),
          ("Sandan-ro", "", "Pyeongtaek-si", "Gyeonggi-do"), ("Saneop-ro", "Nam-gu", "Ulsan", ""), ("Okpo-ro", "", "Geoje-si", "Gyeongsangnam-do"),
          ("Jecheol-ro", "", "Gwangyang-si", "Jeollanam-do"), ("Suchul-daero", "", "Gumi-si", "Gyeongsangbuk-do")]

EMAIL_DOMAINS = ["gmail.com", "naver.com", "daum.net", "hanmail.net", "outlook.com"]
DATES = ["2024-03-15", "2024.03.15", "3/15", "15 Mar 2024", "2024년 3월 15일", "2023-11-02", "2024.01.08", "2025-06-30"]


def _rnd_digits(r: random.Random, n: int) -> str:
    return "".join(r.choice("0123456789") for _ in range(n))


def _batchim(word: str) -> int | None:
    ch = word[-1]
    if "가" <= ch <= "힣":
        return (ord(ch) - 0xAC00) % 28
    return None


def josa(word: str, pair: str) -> str:
    """Korean particle that fits `word`: 이/가, 은/는, 을/를, 과/와, 으로/로."""
    b = _batchim(word)
    with_final = b not in (None, 0)
    if pair == "이가":
        return "이" if with_final else "가"
    if pair == "은는":
        return "은" if with_final else "는"
    if pair == "을를":
        return "을" if with_final else "를"
    if pair == "과와":
        return "과" if with_final else "와"
    return "으로" if with_final and b != 8 else "로"


class Fillers:
    def __init__(self, r: random.Random, config: dict) -> None:
        self.r = r
        self.config = config
        self.lang = "ko"

    def _by_script(self, names: list[str]) -> str:
        hangul = [n for n in names if re.search("[가-힣]", n)]
        latin = [n for n in names if not re.search("[가-힣]", n)]
        return self.r.choice((hangul if self.lang == "ko" else latin) or names)

    def pko(self) -> str:
        r = self.r
        sur = r.choice(KO_SURNAMES)
        given = r.choice(KO_G1) + (r.choice(KO_G2) if r.random() < 0.9 else "")
        return sur + given

    def _en_full(self) -> str:
        r = self.r
        first, last = r.choice(EN_FIRST), r.choice(EN_LAST)
        form = r.random()
        if form < 0.7:
            return f"{first} {last}"
        if form < 0.85:
            return f"{first[0]}. {last}"
        return f"{first} {r.choice('ABCDEFGHJKLMPRSTW')}. {last}"

    def pen(self) -> str:
        return self._en_full() if self.r.random() < 0.75 else self.pkr()

    def pen_last(self) -> str:
        return self.r.choice(EN_LAST + KR_ROM_SUR)

    def pen_first(self) -> str:
        return self.r.choice(EN_FIRST)

    def pkr(self) -> str:
        r = self.r
        sur = r.choice(KR_ROM_SUR)
        a, b = r.choice(KR_ROM_SYL), r.choice(KR_ROM_SYL)
        form = r.random()
        if form < 0.35:
            return f"{sur} {a.capitalize()}-{b}"
        if form < 0.65:
            return f"{a.capitalize()}-{b} {sur}"
        if form < 0.85:
            return f"{a.capitalize()}{b} {sur}"
        return f"{sur} {a.capitalize()}{b}"

    def mob(self) -> str:
        r = self.r
        mid, end = _rnd_digits(r, 4), _rnd_digits(r, 4)
        return r.choice([f"010-{mid}-{end}"] * 5 + [f"010 {mid} {end}", f"010.{mid}.{end}", f"010{mid}{end}",
                                                       f"011-{_rnd_digits(r, 3)}-{end}", f"016-{mid}-{end}"])

    def land(self) -> str:
        r = self.r
        area = r.choice(["02", "031", "032", "041", "043", "051", "052", "053", "054", "055", "061", "063", "070"])
        mid = _rnd_digits(r, r.choice([3, 4]))
        end = _rnd_digits(r, 4)
        return r.choice([f"{area}-{mid}-{end}"] * 4 + [f"({area}) {mid}-{end}", f"{area}.{mid}.{end}", f"{area} {mid} {end}"])

    def rep(self) -> str:
        r = self.r
        return f"{r.choice(['1588', '1577', '1644', '1600', '1899', '1566', '1661'])}-{_rnd_digits(r, 4)}"

    def intl(self) -> str:
        r = self.r
        d = lambda n: _rnd_digits(r, n)  # noqa: E731
        return r.choice([f"+49 711 {d(4)} {d(4)}", f"+49-89-{d(8)}", f"+1 (248) 555-{d(4)}", f"+1 864-555-{d(4)}",
                         f"+86 21 {d(4)} {d(4)}", f"+81-3-{d(4)}-{d(4)}", f"+48 22 {d(3)} {d(2)} {d(2)}",
                         f"+84 24 {d(4)} {d(4)}", f"+91 22 {d(4)} {d(4)}", f"+52 81 {d(4)} {d(4)}", f"+44 121 {d(3)} {d(4)}"])

    def mob_intl(self) -> str:
        r = self.r
        a, b = _rnd_digits(r, 4), _rnd_digits(r, 4)
        return r.choice([f"+82-10-{a}-{b}", f"+82 10 {a} {b}", f"+82 (0)10-{a}-{b}", f"+8210{a}{b}"])

    def land_intl(self) -> str:
        r = self.r
        return r.choice([f"+82-2-{_rnd_digits(r, 3)}-{_rnd_digits(r, 4)}", f"+82 31 {_rnd_digits(r, 3)} {_rnd_digits(r, 4)}",
                         f"+82-55-{_rnd_digits(r, 3)}-{_rnd_digits(r, 4)}", f"+82 52 {_rnd_digits(r, 4)} {_rnd_digits(r, 4)}"])

    def email(self) -> str:
        r = self.r
        first, last = r.choice(KR_ROM_SYL + [f.lower() for f in EN_FIRST[:40]]), r.choice([s.lower() for s in KR_ROM_SUR + EN_LAST[:40]])
        last = re.sub(r"[^a-z]", "", last)
        first = re.sub(r"[^a-z]", "", first)
        stem = r.choice(EN_CO_STEMS).lower()
        return r.choice([f"{first}.{last}@{stem}.co.kr", f"{first[0]}{last}@{stem}-{r.choice(['steel', 'tech', 'chem'])}.com",
                         f"{last}{first}{_rnd_digits(r, 2)}@{r.choice(EMAIL_DOMAINS)}", f"{first}_{last}@{stem}.de",
                         f"qa.{last}@{stem}.com", f"{first}{last}@{r.choice(EMAIL_DOMAINS)}"])

    def rrn(self) -> str:
        r = self.r
        year = r.randint(60, 105)
        yy = year % 100
        month, day = r.randint(1, 12), r.randint(1, 28)
        gender = r.choice("12") if year < 100 else r.choice("34")
        sep = "-" if r.random() < 0.9 else ""
        return f"{yy:02d}{month:02d}{day:02d}{sep}{gender}{_rnd_digits(self.r, 6)}"

    def brn(self) -> str:
        r = self.r
        return f"{r.randint(101, 899)}-{r.randint(10, 99)}-{_rnd_digits(r, 5)}"

    def brn_raw(self) -> str:
        return self.brn().replace("-", "") if self.r.random() < 0.5 else self.brn()

    def _ko_stem(self) -> str:
        r = self.r
        if r.random() < 0.7:
            return r.choice(KO_CO_STEMS)
        return r.choice(KO_G1) + r.choice(KO_G2)

    def cctx(self) -> str:
        return self._ko_stem() + self.r.choice(KO_CO_SECT)

    def cko(self) -> str:
        r = self.r
        name = self.cctx()
        return r.choice([f"(주){name}", f"㈜{name}", f"주식회사 {name}", f"{name}(주)", f"{name} 주식회사", f"(주) {name}", f"{name}㈜"])

    def cctx_en(self) -> str:
        return f"{self.r.choice(EN_CO_STEMS)} {self.r.choice(EN_CO_SECT)}"

    def cen(self) -> str:
        r = self.r
        name = self.cctx_en() if r.random() < 0.8 else r.choice(EN_CO_STEMS)
        legal = r.choice(EN_LEGAL)
        return f"{name}{',' if legal.startswith('Inc') and r.random() < 0.3 else ''} {legal}"

    def member(self) -> str:
        return self._by_script(self.config["member_names"])

    def customer(self) -> str:
        return self._by_script(self.config["customer_names"])

    def ako(self) -> str:
        r = self.r
        if r.random() < 0.25:
            head, sub = r.choice(KO_LOTS)
            return f"{head} {sub} {r.randint(1, 999)}{'-' + str(r.randint(1, 30)) if r.random() < 0.6 else ''}{'번지' if r.random() < 0.6 else ''}"
        provs, cities, gus, roads = r.choice(KO_ADDR)
        parts = [r.choice(provs), r.choice(cities), r.choice(gus)]
        road = r.choice(roads)
        num = str(r.randint(1, 999))
        if r.random() < 0.25:
            road = f"{road} {r.randint(10, 300)}번길"
        if r.random() < 0.2:
            num += f"-{r.randint(1, 20)}"
        addr = " ".join(p for p in parts if p) + f" {road} {num}"
        tail = r.random()
        if tail < 0.15:
            addr += f", {r.randint(2, 5)}층"
        elif tail < 0.25:
            addr += f" {r.randint(1, 3)}동 {r.randint(101, 405)}호"
        return addr

    def aen(self) -> str:
        r = self.r
        if r.random() < 0.25:
            return self.aen_de()
        city, st = r.choice(EN_CITIES)
        addr = f"{r.randint(10, 9800)} {r.choice(EN_STREETS)} {r.choice(EN_TYPES)}"
        if r.random() < 0.3:
            addr += f", Suite {r.randint(100, 450)}"
        return addr + f", {city}, {st} {_rnd_digits(r, 5)}"

    def aen_de(self) -> str:
        r = self.r
        return f"{r.choice(DE_STREETS)} {r.randint(1, 140)}, {r.randint(10000, 99999)} {r.choice(DE_CITIES)}"

    def aen_kr(self) -> str:
        r = self.r
        road, gu, si, do = r.choice(KR_ROM)
        admin = ", ".join(p for p in (gu, si, do) if p)
        if r.random() < 0.5:
            return f"{r.randint(1, 999)} {road}, {admin}"
        return f"{road} {r.randint(10, 300)}beon-gil {r.randint(1, 60)}, {admin}"

    def serial(self) -> str:
        r = self.r
        d = lambda n: _rnd_digits(r, n)  # noqa: E731
        L = lambda: r.choice("ABCDEFGHJKLMNPRSTUVWXYZ")  # noqa: E731
        return r.choice([f"{d(1)}{L()}{d(1)}{L()}{d(4)}", f"SN{d(4)}-{d(4)}", f"{L()}{L()}{d(6)}-{d(3)}", f"{L()}{d(2)}-{d(7)}",
                         f"{d(4)}-{d(3)}", f"MTR-{d(2)}-{d(5)}", f"FAN{d(4)}-{L()}", f"{d(2)}{L()}{d(5)}"])

    def mser(self) -> str:
        r = self.r
        if r.random() < 0.6:
            return f"HB{_rnd_digits(r, 2)}{r.choice('ABCDEFGHJK')}{_rnd_digits(r, 5)}"
        return f"SY-{_rnd_digits(r, 6)}-{_rnd_digits(r, 3)}"

    def part(self) -> str:
        r = self.r
        d = lambda n: _rnd_digits(r, n)  # noqa: E731
        L = lambda: r.choice("ABCDEFGHJKLMNPRSTUVWXYZ")  # noqa: E731
        return r.choice([f"{d(2)}-{L()}{L()}{d(3)}", f"{L()}{d(4)}-{d(4)}", f"{d(5)}-{d(1)}{L()}{d(3)}", f"PCB-{d(4)}-R{d(1)}",
                         f"{d(1)}K{d(1)}-{d(3)}-{d(3)}", f"{L()}{L()}{d(6)}"])

    def mpart(self) -> str:
        r = self.r
        if r.random() < 0.6:
            suffix = f"-{r.choice('ABCDE')}" if r.random() < 0.5 else ""
            return f"HB-{r.choice(['BR', 'VL', 'SH', 'GK', 'PM'])}{_rnd_digits(r, 4)}{suffix}"
        return f"DH{_rnd_digits(r, 3)}-{_rnd_digits(r, 4)}-{r.choice('ABCDEFG')}"

    # harmless fillers
    def date(self) -> str:
        return self.r.choice(DATES if self.lang == "ko" else [d for d in DATES if "년" not in d])

    def time(self) -> str:
        return f"{self.r.randint(0, 23):02d}:{self.r.choice(['00', '10', '30', '40', '55'])}"


_PLACEHOLDER = re.compile(r"\{(\w+)(?:\|(\w+))?\}")


def render(template: str, fill: Fillers) -> tuple[str, list[dict]]:
    text, spans, pos = "", [], 0
    for m in _PLACEHOLDER.finditer(template):
        text += template[pos:m.start()]
        name, particle = m.group(1), m.group(2)
        value = getattr(fill, name)()
        if name in KIND_OF:
            spans.append({"kind": KIND_OF[name], "start": len(text), "end": len(text) + len(value), "value": value})
        text += value
        if particle:
            text += josa(value, particle)
        pos = m.end()
    text += template[pos:]
    return text, spans


def build(seed: int, config: dict, n_per_lang: int = N_PER_LANG) -> list[dict]:
    r = random.Random(seed)
    fill = Fillers(r, config)
    records = []
    for lang, pos_t, neg_t in (("ko", KO, KO_NEG), ("en", EN, EN_NEG)):
        fill.lang = lang
        usable = [(i, t) for i, (t, held) in enumerate(pos_t) if seed != 0 or not held]
        n_neg = round(n_per_lang * NEG_SHARE)
        picks = [("pos", usable[k % len(usable)]) for k in range(n_per_lang - n_neg)]
        picks += [("neg", (i, neg_t[i])) for i in (k % len(neg_t) for k in range(n_neg))]
        for k, (sort, (i, template)) in enumerate(picks):
            text, spans = render(template, fill)
            records.append({"id": f"{lang}-{k:03d}", "lang": lang, "template": f"{lang}-{sort}-{i:02d}",
                            "text": text, "spans": spans})
    return records


def load_config(path: Path | None = None) -> dict:
    import yaml

    return yaml.safe_load((path or OUT.parent / "deid_eval_config.yaml").read_text(encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    records = build(a.seed, load_config())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    n_spans = sum(len(x["spans"]) for x in records)
    print(f"wrote {len(records)} sentences, {n_spans} planted identifiers (seed {a.seed}) to {a.out}")


if __name__ == "__main__":
    main()
