"""Offline byte-level BPE tokenizers for tiny backbones (no hub download).

Byte-level BPE never meets an unknown character, so a small corpus is enough for any script. CJK
ideographs and kana are split into single characters before BPE: otherwise a whole Chinese phrase (no
spaces) merges into one token that a tiny model never sees again.
"""

from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# CJK unified ideographs (+ extension A, compatibility), hiragana, katakana, CJK symbols and punctuation.
CJK_CHARS = r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"

# A few sentences per language (en, es, it, ko, pl, ru, tr, zh, de, fr) about everyday scenes, so that the
# merges cover the scripts of the evaluation languages when no corpus is given.
BUILTIN_CORPUS = """\
A red circle and a blue square on a white background.
A cat sleeps on the sofa next to a small dog.
Represent the given image with the following question: what is in the image?
Find me an everyday image that matches the given caption.
Un círculo rojo y un cuadrado azul sobre un fondo blanco.
Un gato duerme en el sofá junto a un perro pequeño.
Encuentra una imagen cotidiana que coincida con la descripción.
Un cerchio rosso e un quadrato blu su uno sfondo bianco.
Un gatto dorme sul divano accanto a un piccolo cane.
Trova un'immagine quotidiana che corrisponda alla didascalia.
흰색 배경 위에 빨간 원과 파란 사각형이 있습니다.
고양이가 작은 개 옆 소파에서 자고 있습니다.
주어진 설명과 일치하는 일상적인 이미지를 찾아 주세요.
Czerwone koło i niebieski kwadrat na białym tle.
Kot śpi na kanapie obok małego psa.
Znajdź codzienne zdjęcie pasujące do podanego opisu.
Красный круг и синий квадрат на белом фоне.
Кошка спит на диване рядом с маленькой собакой.
Найди повседневное изображение, которое соответствует подписи.
Beyaz bir arka plan üzerinde kırmızı bir daire ve mavi bir kare.
Bir kedi küçük bir köpeğin yanında kanepede uyuyor.
Verilen açıklamayla eşleşen gündelik bir görüntü bul.
白色背景上有一个红色的圆和一个蓝色的正方形。
一只猫睡在小狗旁边的沙发上。
请找一张与给定描述相符的日常图片。
Ein roter Kreis und ein blaues Quadrat auf weißem Hintergrund.
Eine Katze schläft neben einem kleinen Hund auf dem Sofa.
Finde ein alltägliches Bild, das zur gegebenen Beschreibung passt.
Un cercle rouge et un carré bleu sur un fond blanc.
Un chat dort sur le canapé à côté d'un petit chien.
Trouve une image du quotidien qui correspond à la légende donnée.
"""


def train_bpe(
    texts: Iterable[str],
    special_tokens: Sequence[str],
    vocab_size: int,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    add_bos: bool,
    named_tokens: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; `special_tokens` get the first ids, in order, and are never split.

    `add_bos` makes the tokenizer prepend `bos_token` as LLaVA's (Llama 2) and Gemma's do (Llama 3.2's does
    not). `named_tokens` become tokenizer attributes that processors read (e.g. Gemma 3's `boi_token`; saved
    with the tokenizer).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CJK_CHARS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        assert bos_token is not None, "add_bos needs a bos_token"
        bos = (bos_token, tok.token_to_id(bos_token))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[bos]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
        padding_side="left", **(named_tokens or {}),
    )
