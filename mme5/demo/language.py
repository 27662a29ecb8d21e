"""Texts about demo scenes in eleven languages, from one table per language (no code per language).

Word entries use a small notation so that agreement stays in the table:
- `"label=forms"`: the optional `label=` gives the citation form used as a class label or answer
  (German "rot" for "roter/rote/rotes"); without it the first form is the label;
- `forms` is `"singular;plural"`, each a `/`-list with one form per grammatical gender of the language
  (in the order of its `genders`); one form means it does not vary. "Plural" is the form used after the
  numbers 2 and 3 (Russian: genitive singular nouns and genitive plural adjectives);
- nouns start with their gender, `"f:estrella;estrellas"`, in languages that have genders.
`phrase` names the objects (count, size, colour, shape: what grounding refers to); `caption` places the
phrase on its background. Codes follow XTD: `jp` is Japanese.
"""

from __future__ import annotations

from mme5.demo.scenes import VALUES, Scene

LANGUAGES: dict[str, dict] = {
    "en": {
        "genders": "",
        "shape": {"circle": "circle;circles", "square": "square;squares", "triangle": "triangle;triangles",
                  "diamond": "diamond;diamonds", "star": "star;stars", "cross": "cross;crosses"},
        "colour": {c: c for c in VALUES["colour"]},
        "size": {"small": "small", "large": "large"},
        "count": {1: "one=a", 2: "two", 3: "three"},
        "position": {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom"},
        "background": {"white": "white|on a white background", "grey": "grey|on a grey background",
                       "black": "black|on a black background",
                       "light_blue": "light blue|on a light blue background",
                       "beige": "beige|on a beige background"},
        "phrase": "{count} {size} {colour} {shape}",
        "caption": "{phrase} {position} {background}",
        "question": {"shape": "What shape are the objects?", "colour": "What colour are the objects?",
                     "count": "How many objects are there?", "size": "How big are the objects?",
                     "position": "Where are the objects?", "background": "What colour is the background?"},
        "edit": {"colour": "change the colour to {value}", "shape": "change the shape to {value}",
                 "count": "change the number of objects to {value}"},
    },
    "es": {
        "genders": "mf",
        "shape": {"circle": "m:círculo;círculos", "square": "m:cuadrado;cuadrados",
                  "triangle": "m:triángulo;triángulos", "diamond": "m:rombo;rombos",
                  "star": "f:estrella;estrellas", "cross": "f:cruz;cruces"},
        "colour": {"red": "rojo/roja;rojos/rojas", "orange": "naranja;naranjas",
                   "yellow": "amarillo/amarilla;amarillos/amarillas", "green": "verde;verdes",
                   "blue": "azul;azules", "purple": "morado/morada;morados/moradas", "pink": "rosa;rosas",
                   "brown": "marrón;marrones"},
        "size": {"small": "pequeño/pequeña;pequeños/pequeñas", "large": "grande;grandes"},
        "count": {1: "uno=un/una", 2: "dos", 3: "tres"},
        "position": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo"},
        "background": {"white": "blanco|sobre fondo blanco", "grey": "gris|sobre fondo gris",
                       "black": "negro|sobre fondo negro", "light_blue": "celeste|sobre fondo celeste",
                       "beige": "beige|sobre fondo beige"},
        "phrase": "{count} {shape} {colour} {size}",
        "caption": "{phrase} {position} {background}",
        "question": {"shape": "¿Qué forma tienen los objetos?", "colour": "¿De qué color son los objetos?",
                     "count": "¿Cuántos objetos hay?", "size": "¿De qué tamaño son los objetos?",
                     "position": "¿Dónde están los objetos?", "background": "¿De qué color es el fondo?"},
        "edit": {"colour": "cambia el color a {value}", "shape": "cambia la forma a {value}",
                 "count": "cambia el número de objetos a {value}"},
    },
    "it": {
        "genders": "mf",
        "shape": {"circle": "m:cerchio;cerchi", "square": "m:quadrato;quadrati",
                  "triangle": "m:triangolo;triangoli", "diamond": "m:rombo;rombi", "star": "f:stella;stelle",
                  "cross": "f:croce;croci"},
        "colour": {"red": "rosso/rossa;rossi/rosse", "orange": "arancione;arancioni",
                   "yellow": "giallo/gialla;gialli/gialle", "green": "verde;verdi", "blue": "blu",
                   "purple": "viola", "pink": "rosa", "brown": "marrone;marroni"},
        "size": {"small": "piccolo/piccola;piccoli/piccole", "large": "grande;grandi"},
        "count": {1: "uno=un/una", 2: "due", 3: "tre"},
        "position": {"left": "a sinistra", "right": "a destra", "top": "in alto", "bottom": "in basso"},
        "background": {"white": "bianco|su sfondo bianco", "grey": "grigio|su sfondo grigio",
                       "black": "nero|su sfondo nero", "light_blue": "azzurro|su sfondo azzurro",
                       "beige": "beige|su sfondo beige"},
        "phrase": "{count} {size} {shape} {colour}",
        "caption": "{phrase} {position} {background}",
        "question": {"shape": "Che forma hanno gli oggetti?", "colour": "Di che colore sono gli oggetti?",
                     "count": "Quanti oggetti ci sono?", "size": "Quanto sono grandi gli oggetti?",
                     "position": "Dove si trovano gli oggetti?", "background": "Di che colore è lo sfondo?"},
        "edit": {"colour": "cambia il colore in {value}", "shape": "cambia la forma in {value}",
                 "count": "cambia il numero di oggetti in {value}"},
    },
    "fr": {
        "genders": "mf",
        "shape": {"circle": "m:cercle;cercles", "square": "m:carré;carrés",
                  "triangle": "m:triangle;triangles", "diamond": "m:losange;losanges",
                  "star": "f:étoile;étoiles", "cross": "f:croix;croix"},
        "colour": {"red": "rouge;rouges", "orange": "orange", "yellow": "jaune;jaunes",
                   "green": "vert/verte;verts/vertes", "blue": "bleu/bleue;bleus/bleues",
                   "purple": "violet/violette;violets/violettes", "pink": "rose;roses", "brown": "marron"},
        "size": {"small": "petit/petite;petits/petites", "large": "grand/grande;grands/grandes"},
        "count": {1: "un/une", 2: "deux", 3: "trois"},
        "position": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas"},
        "background": {"white": "blanc|sur fond blanc", "grey": "gris|sur fond gris",
                       "black": "noir|sur fond noir", "light_blue": "bleu clair|sur fond bleu clair",
                       "beige": "beige|sur fond beige"},
        "phrase": "{count} {size} {shape} {colour}",
        "caption": "{phrase} {position} {background}",
        "question": {"shape": "Quelle forme ont les objets ?",
                     "colour": "De quelle couleur sont les objets ?",
                     "count": "Combien y a-t-il d'objets ?", "size": "Quelle taille ont les objets ?",
                     "position": "Où se trouvent les objets ?",
                     "background": "De quelle couleur est le fond ?"},
        "edit": {"colour": "change la couleur en {value}", "shape": "change la forme en {value}",
                 "count": "passe le nombre d'objets à {value}"},
    },
    "de": {
        "genders": "mfn",
        "shape": {"circle": "m:Kreis;Kreise", "square": "n:Quadrat;Quadrate",
                  "triangle": "n:Dreieck;Dreiecke", "diamond": "f:Raute;Rauten", "star": "m:Stern;Sterne",
                  "cross": "n:Kreuz;Kreuze"},
        "colour": {"red": "rot=roter/rote/rotes;rote",
                   "orange": "orange=orangefarbener/orangefarbene/orangefarbenes;orangefarbene",
                   "yellow": "gelb=gelber/gelbe/gelbes;gelbe", "green": "grün=grüner/grüne/grünes;grüne",
                   "blue": "blau=blauer/blaue/blaues;blaue",
                   "purple": "violett=violetter/violette/violettes;violette",
                   "pink": "rosa=rosafarbener/rosafarbene/rosafarbenes;rosafarbene",
                   "brown": "braun=brauner/braune/braunes;braune"},
        "size": {"small": "klein=kleiner/kleine/kleines;kleine", "large": "groß=großer/große/großes;große"},
        "count": {1: "eins=ein/eine/ein", 2: "zwei", 3: "drei"},
        "position": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten"},
        "background": {"white": "weiß|auf weißem Hintergrund", "grey": "grau|auf grauem Hintergrund",
                       "black": "schwarz|auf schwarzem Hintergrund",
                       "light_blue": "hellblau|auf hellblauem Hintergrund",
                       "beige": "beige|auf beigem Hintergrund"},
        "phrase": "{count} {size} {colour} {shape}",
        "caption": "{phrase} {position} {background}",
        "question": {"shape": "Welche Form haben die Objekte?", "colour": "Welche Farbe haben die Objekte?",
                     "count": "Wie viele Objekte gibt es?", "size": "Wie groß sind die Objekte?",
                     "position": "Wo befinden sich die Objekte?",
                     "background": "Welche Farbe hat der Hintergrund?"},
        "edit": {"colour": "neue Farbe: {value}", "shape": "neue Form: {value}",
                 "count": "neue Anzahl: {value}"},
    },
    "ru": {
        "genders": "mfn",
        "shape": {"circle": "m:круг;круга", "square": "m:квадрат;квадрата",
                  "triangle": "m:треугольник;треугольника", "diamond": "m:ромб;ромба",
                  "star": "f:звезда;звезды", "cross": "m:крест;креста"},
        "colour": {"red": "красный/красная/красное;красных",
                   "orange": "оранжевый/оранжевая/оранжевое;оранжевых",
                   "yellow": "жёлтый/жёлтая/жёлтое;жёлтых", "green": "зелёный/зелёная/зелёное;зелёных",
                   "blue": "синий/синяя/синее;синих",
                   "purple": "фиолетовый/фиолетовая/фиолетовое;фиолетовых",
                   "pink": "розовый/розовая/розовое;розовых",
                   "brown": "коричневый/коричневая/коричневое;коричневых"},
        "size": {"small": "маленький/маленькая/маленькое;маленьких",
                 "large": "большой/большая/большое;больших"},
        "count": {1: "один/одна/одно", 2: "два/две/два", 3: "три"},
        "position": {"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу"},
        "background": {"white": "белый|на белом фоне", "grey": "серый|на сером фоне",
                       "black": "чёрный|на чёрном фоне", "light_blue": "голубой|на голубом фоне",
                       "beige": "бежевый|на бежевом фоне"},
        "phrase": "{count} {size} {colour} {shape}",
        "caption": "{phrase} {position} {background}",
        "question": {"shape": "Какой формы объекты?", "colour": "Какого цвета объекты?",
                     "count": "Сколько здесь объектов?", "size": "Какого размера объекты?",
                     "position": "Где находятся объекты?", "background": "Какого цвета фон?"},
        "edit": {"colour": "новый цвет: {value}", "shape": "новая форма: {value}",
                 "count": "новое количество: {value}"},
    },
    "pl": {
        "genders": "mfn",
        "shape": {"circle": "n:koło;koła", "square": "m:kwadrat;kwadraty", "triangle": "m:trójkąt;trójkąty",
                  "diamond": "m:romb;romby", "star": "f:gwiazda;gwiazdy", "cross": "m:krzyż;krzyże"},
        "colour": {"red": "czerwony/czerwona/czerwone;czerwone",
                   "orange": "pomarańczowy/pomarańczowa/pomarańczowe;pomarańczowe",
                   "yellow": "żółty/żółta/żółte;żółte", "green": "zielony/zielona/zielone;zielone",
                   "blue": "niebieski/niebieska/niebieskie;niebieskie",
                   "purple": "fioletowy/fioletowa/fioletowe;fioletowe", "pink": "różowy/różowa/różowe;różowe",
                   "brown": "brązowy/brązowa/brązowe;brązowe"},
        "size": {"small": "mały/mała/małe;małe", "large": "duży/duża/duże;duże"},
        "count": {1: "jeden/jedna/jedno", 2: "dwa/dwie/dwa", 3: "trzy"},
        "position": {"left": "po lewej stronie", "right": "po prawej stronie", "top": "na górze",
                     "bottom": "na dole"},
        "background": {"white": "biały|na białym tle", "grey": "szary|na szarym tle",
                       "black": "czarny|na czarnym tle", "light_blue": "błękitny|na błękitnym tle",
                       "beige": "beżowy|na beżowym tle"},
        "phrase": "{count} {size} {colour} {shape}",
        "caption": "{phrase} {position} {background}",
        "question": {"shape": "Jaki kształt mają obiekty?", "colour": "Jakiego koloru są obiekty?",
                     "count": "Ile jest obiektów?", "size": "Jakiej wielkości są obiekty?",
                     "position": "Gdzie znajdują się obiekty?", "background": "Jakiego koloru jest tło?"},
        "edit": {"colour": "zmień kolor na {value}", "shape": "nowy kształt: {value}",
                 "count": "zmień liczbę obiektów na {value}"},
    },
    "tr": {
        "genders": "",
        "shape": {"circle": "daire", "square": "kare", "triangle": "üçgen", "diamond": "eşkenar dörtgen",
                  "star": "yıldız", "cross": "artı işareti"},
        "colour": {"red": "kırmızı", "orange": "turuncu", "yellow": "sarı", "green": "yeşil", "blue": "mavi",
                   "purple": "mor", "pink": "pembe", "brown": "kahverengi"},
        "size": {"small": "küçük", "large": "büyük"},
        "count": {1: "bir", 2: "iki", 3: "üç"},
        "position": {"left": "solda", "right": "sağda", "top": "üstte", "bottom": "altta"},
        "background": {"white": "beyaz|beyaz zemin üzerinde", "grey": "gri|gri zemin üzerinde",
                       "black": "siyah|siyah zemin üzerinde",
                       "light_blue": "açık mavi|açık mavi zemin üzerinde",
                       "beige": "bej|bej zemin üzerinde"},
        "phrase": "{count} {size} {colour} {shape}",
        "caption": "{background} {position} {phrase}",
        "question": {"shape": "Nesneler hangi şekilde?", "colour": "Nesneler ne renk?",
                     "count": "Kaç nesne var?", "size": "Nesneler ne büyüklükte?",
                     "position": "Nesneler nerede?",
                     "background": "Zemin ne renk?"},
        "edit": {"colour": "rengi {value} yap", "shape": "şekli {value} yap",
                 "count": "nesne sayısını {value} yap"},
    },
    "zh": {
        "genders": "",
        "shape": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形",
                  "star": "星形", "cross": "十字形"},
        "colour": {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "blue": "蓝色",
                   "purple": "紫色", "pink": "粉色", "brown": "棕色"},
        "size": {"small": "小", "large": "大"},
        "count": {1: "一个", 2: "两个", 3: "三个"},
        "position": {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方"},
        "background": {"white": "白色|白色背景", "grey": "灰色|灰色背景", "black": "黑色|黑色背景",
                       "light_blue": "浅蓝色|浅蓝色背景", "beige": "米色|米色背景"},
        "phrase": "{count}{colour}{size}{shape}",
        "caption": "{background}{position}的{phrase}",
        "question": {"shape": "这些物体是什么形状？", "colour": "这些物体是什么颜色？",
                     "count": "图中有几个物体？", "size": "这些物体有多大？",
                     "position": "这些物体在哪里？", "background": "背景是什么颜色？"},
        "edit": {"colour": "把颜色改成{value}", "shape": "把形状改成{value}", "count": "把数量改成{value}"},
    },
    "ko": {
        "genders": "",
        "shape": {"circle": "원", "square": "정사각형", "triangle": "삼각형", "diamond": "마름모",
                  "star": "별", "cross": "십자"},
        "colour": {"red": "빨간색", "orange": "주황색", "yellow": "노란색", "green": "초록색",
                   "blue": "파란색", "purple": "보라색", "pink": "분홍색", "brown": "갈색"},
        "size": {"small": "작다=작은", "large": "크다=큰"},
        "count": {1: "한 개", 2: "두 개", 3: "세 개"},
        "position": {"left": "왼쪽에", "right": "오른쪽에", "top": "위쪽에", "bottom": "아래쪽에"},
        "background": {"white": "흰색|흰색 배경", "grey": "회색|회색 배경", "black": "검은색|검은색 배경",
                       "light_blue": "하늘색|하늘색 배경", "beige": "베이지색|베이지색 배경"},
        "phrase": "{size} {colour} {shape} {count}",
        "caption": "{background}의 {position} 있는 {phrase}",
        "question": {"shape": "물체는 어떤 모양인가요?", "colour": "물체는 무슨 색인가요?",
                     "count": "물체는 몇 개인가요?", "size": "물체의 크기는 어떤가요?",
                     "position": "물체는 어디에 있나요?", "background": "배경은 무슨 색인가요?"},
        # every colour ends in 색 and every count in 개: the particles 으로/로 are fixed.
        "edit": {"colour": "색을 {value}으로 바꾸기", "shape": "모양을 {value} 모양으로 바꾸기",
                 "count": "개수를 {value}로 바꾸기"},
    },
    "jp": {
        "genders": "",
        "shape": {"circle": "円", "square": "四角形", "triangle": "三角形", "diamond": "ひし形", "star": "星",
                  "cross": "十字"},
        "colour": {"red": "赤色", "orange": "オレンジ色", "yellow": "黄色", "green": "緑色", "blue": "青色",
                   "purple": "紫色", "pink": "ピンク色", "brown": "茶色"},
        "size": {"small": "小さい", "large": "大きい"},
        "count": {1: "一つ", 2: "二つ", 3: "三つ"},
        "position": {"left": "左側", "right": "右側", "top": "上側", "bottom": "下側"},
        "background": {"white": "白|白い背景", "grey": "灰色|灰色の背景", "black": "黒|黒い背景",
                       "light_blue": "水色|水色の背景", "beige": "ベージュ|ベージュの背景"},
        "phrase": "{count}の{size}{colour}の{shape}",
        "caption": "{background}の{position}にある{phrase}",
        "question": {"shape": "物体はどんな形ですか？", "colour": "物体は何色ですか？",
                     "count": "物体はいくつありますか？", "size": "物体の大きさはどうですか？",
                     "position": "物体はどこにありますか？",
                     "background": "背景は何色ですか？"},
        "edit": {"colour": "色を{value}に変える", "shape": "形を{value}に変える",
                 "count": "数を{value}に変える"},
    },
}
XTD10 = ("en", "es", "it", "ko", "pl", "ru", "tr", "zh")
DEFAULT_LANGUAGES = XTD10 + ("de", "fr", "jp")
EDITABLE = ("colour", "shape", "count")  # the attributes an edit text can change


def _table(language: str) -> dict:
    try:
        return LANGUAGES[language]
    except KeyError:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}") from None


def _split_label(entry: str) -> tuple[str | None, str]:
    label, _, forms = entry.rpartition("=")
    return label or None, forms


def _inflect(entry: str, gender: int, plural: bool) -> str:
    parts = _split_label(entry)[1].split(";")
    forms = parts[1 if plural and len(parts) > 1 else 0].split("/")
    return forms[gender if len(forms) > 1 else 0]


def _noun(table: dict, shape: str) -> tuple[int, str]:
    """(gender index, entry) of a shape noun."""
    entry = table["shape"][shape]
    if not table["genders"]:
        return 0, entry
    gender, _, entry = entry.partition(":")
    return table["genders"].index(gender), entry


def label(attribute: str, value: object, language: str) -> str:
    """The citation form of an attribute value: a class label or a short answer."""
    table = _table(language)
    entry = table[attribute][value]
    if attribute == "background":
        return entry.split("|")[0]
    if attribute == "position":
        return entry
    if attribute == "shape":
        entry = _noun(table, value)[1]
    explicit, _ = _split_label(entry)
    return explicit or _inflect(entry, 0, False)


def phrase(scene: Scene, language: str) -> str:
    """The objects of a scene as a noun phrase whose words agree with the noun ("dos círculos rojos ...")."""
    table = _table(language)
    gender, noun = _noun(table, scene.shape)
    plural = scene.count > 1
    return table["phrase"].format(
        count=_inflect(table["count"][scene.count], gender, plural),
        size=_inflect(table["size"][scene.size], gender, plural),
        colour=_inflect(table["colour"][scene.colour], gender, plural),
        shape=_inflect(noun, 0, plural),
    )


def caption(scene: Scene, language: str) -> str:
    """A full description: every attribute of the scene is in it, so distinct scenes get distinct captions."""
    table = _table(language)
    return table["caption"].format(
        phrase=phrase(scene, language),
        position=table["position"][scene.position],
        background=table["background"][scene.background].split("|")[1],
    )


def question(attribute: str, language: str) -> str:
    return _table(language)["question"][attribute]


def options(attribute: str, language: str) -> str:
    """All labels of an attribute, as a comma-separated option list."""
    return ", ".join(label(attribute, value, language) for value in VALUES[attribute])


def edit(attribute: str, value: object, language: str) -> str:
    """A modification text asking for `attribute` to become `value`."""
    return _table(language)["edit"][attribute].format(value=label(attribute, value, language))


# Moving scenes (the demo's clips): the objects travel into the half their `position` names, so a
# direction is that half ("left" ... "bottom" read as moving left ... down). Per language: the direction
# words (class labels and answers), the clip caption around the phrase, the question about the motion.
MOTION: dict[str, dict] = {
    "en": {"direction": {"left": "left", "right": "right", "top": "up", "bottom": "down"},
           "caption": "{phrase} moving {direction} {background}",
           "question": "Which way do the objects move?"},
    "es": {"direction": {"left": "hacia la izquierda", "right": "hacia la derecha", "top": "hacia arriba",
                         "bottom": "hacia abajo"},
           "caption": "{phrase} moviéndose {direction} {background}",
           "question": "¿Hacia dónde se mueven los objetos?"},
    "it": {"direction": {"left": "verso sinistra", "right": "verso destra", "top": "verso l'alto",
                         "bottom": "verso il basso"},
           "caption": "{phrase} in movimento {direction} {background}",
           "question": "In quale direzione si muovono gli oggetti?"},
    "ko": {"direction": {"left": "왼쪽", "right": "오른쪽", "top": "위쪽", "bottom": "아래쪽"},
           "caption": "{background}에서 {direction}으로 움직이는 {phrase}",
           "question": "물체는 어느 쪽으로 움직이나요?"},
    "pl": {"direction": {"left": "w lewo", "right": "w prawo", "top": "w górę", "bottom": "w dół"},
           "caption": "{phrase}, ruch {direction}, {background}",
           "question": "W którą stronę poruszają się obiekty?"},
    "ru": {"direction": {"left": "влево", "right": "вправо", "top": "вверх", "bottom": "вниз"},
           "caption": "{phrase}, движение {direction}, {background}", "question": "Куда движутся объекты?"},
    "tr": {"direction": {"left": "sola", "right": "sağa", "top": "yukarı", "bottom": "aşağı"},
           "caption": "{background} {direction} hareket eden {phrase}",
           "question": "Nesneler hangi yöne hareket ediyor?"},
    "zh": {"direction": {"left": "向左", "right": "向右", "top": "向上", "bottom": "向下"},
           "caption": "{background}上{direction}移动的{phrase}", "question": "物体向哪个方向移动？"},
    "de": {"direction": {"left": "nach links", "right": "nach rechts", "top": "nach oben",
                         "bottom": "nach unten"},
           "caption": "{phrase}, Bewegung {direction}, {background}",
           "question": "In welche Richtung bewegen sich die Objekte?"},
    "fr": {"direction": {"left": "vers la gauche", "right": "vers la droite", "top": "vers le haut",
                         "bottom": "vers le bas"},
           "caption": "{phrase} en mouvement {direction} {background}",
           "question": "Dans quelle direction bougent les objets ?"},
    "jp": {"direction": {"left": "左", "right": "右", "top": "上", "bottom": "下"},
           "caption": "{background}で{direction}へ動く{phrase}",
           "question": "物体はどの方向に動いていますか？"},
}


def direction(position: str, language: str) -> str:
    """The direction a clip's objects move in, as a class label or answer."""
    _table(language)
    return MOTION[language]["direction"][position]


def motion_caption(scene: Scene, language: str) -> str:
    """A clip's description: the objects, where they move, the background (distinct clips, distinct texts)."""
    background = _table(language)["background"][scene.background].split("|")[1]
    return MOTION[language]["caption"].format(phrase=phrase(scene, language),
                                              direction=direction(scene.position, language),
                                              background=background)


def motion_question(language: str) -> str:
    return MOTION[language]["question"]
