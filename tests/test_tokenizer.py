"""The GPT-2 tokenizer works offline from the shipped BPE file and gives GPT-2's ids."""

from gptds.tokenizer import BPE_FILE, EOT_ID, decode, encode, get_tokenizer


def test_known_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode("Hello world, this is GPT-2.") == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]


def test_endoftext_is_50256_and_vocab_is_50257():
    enc = get_tokenizer()
    assert enc.eot_token == EOT_ID == 50256
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_round_trip_and_bpe_file_is_packaged():
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\u00e9\u4e2d"
    assert decode(encode(text)) == text
    assert BPE_FILE.is_file() and BPE_FILE.stat().st_size == 835554
