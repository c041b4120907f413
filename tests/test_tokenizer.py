from transformers import CLIPTokenizer

from sdkit.training import shapes
from sdkit.training.tokenizer import build_clip_tokenizer


def test_every_grammar_word_is_one_token(tmp_path):
    build_clip_tokenizer(shapes.vocabulary(), tmp_path, model_max_length=16)
    tok = CLIPTokenizer.from_pretrained(tmp_path)  # what a pipeline loading the folder sees
    assert tok.model_max_length == 16
    for word in shapes.vocabulary():
        assert tok.tokenize(word) == [word + "</w>"], word
    ids = tok("a large blue square on the left", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[8] == tok.eos_token_id
    # unknown words still tokenize, into byte pieces
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
