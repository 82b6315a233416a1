"""Protocol of the zero-shot perplexity harness: detokenizers, corpora on disk, block wrapping, bits per byte,
the command line on diffusion and AR checkpoints, and the same result on 1 and 2 ranks."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eval import detokenize as dt
from eval.corpora import CorpusError, get_protocol, load_corpus, tokenize_and_wrap, wrap

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------- detokenizers
# Expected strings are written from the reference's rules (kuleshov-group/mdlm dataloader.py), one rule at a time.

def test_wikitext_detokenizer():
    assert dt.wikitext(" = = Early life = = \n") == " == Early life ==\n"
    assert dt.wikitext(" = = = Death = = = \n") == " === Death ===\n"
    assert dt.wikitext(" = = = = Deep = = = = \n") == " ==== Deep ====\n"
    src = ' The team \'s 1 @,@ 000 fans , aged 3 @.@ 5 ( approx . ) , were well @-@ known ; " Craig " said : yes ! \n'
    assert dt.wikitext(src) == ' The team\'s 1,000 fans, aged 3.5 (approx.), were well-known; "Craig" said: yes!\n'
    assert dt.wikitext(" the players ' union [ 1 ] at 25 \N{DEGREE SIGN} C . \n") == \
        " the players' union [1] at 25\N{DEGREE SIGN}C.\n"
    assert dt.wikitext(" scored N points \n") == " scored 1 points\n"  # " N " -> " 1 ", as the reference
    assert dt.wikitext(" { a } and ' quoted ' ? \n") == " {a} and 'quoted'? \n".replace("? \n", "?\n")
    assert dt.wikitext(" a <unk> b \n") == " a <unk> b\n"  # WikiText's <unk> stays
    assert dt.wikitext("") == ""  # a blank hub row


def test_ptb_detokenizer():
    assert dt.ptb("the company 's shares were n't sold") == "the company's shares weren't sold"
    assert dt.ptb("the <unk> 1\\/2 stake of the dealers ' group") == "the ? 1/2 stake of the dealers' group"
    # " N " -> " 1 " (repeated, so runs of N all change); then "$ 1" -> "$1", "# 1" -> "#1"
    assert dt.ptb("at $ N a share , up N N N from # N here") == "at $1 a share , up 1 1 1 from #1 here"
    assert dt.ptb("rose to N") == "rose to N"  # a row-final N has no trailing space: kept
    assert dt.ptb("N years") == "N years"  # a row-initial N has no leading space: kept, as the reference keeps it
    assert dt.ptb(" a \n b") == " a\nb"


def test_lambada_detokenizer():
    # only the curly double quotes change; single curly quotes are left alone
    assert dt.lambada("\u201cHello,\u201d she said.\n\n\u2018Yes\u2019 ") == '\n"Hello," she said.\n\n\u2018Yes\u2019'


def test_lm1b_detokenizer():
    assert dt.lm1b("I 'm here , it 's fine ! OK .") == "I'm here, it's fine! OK."
    assert dt.lm1b('He said " so " and left ( quickly ) . See http : / / a.com for $ 5 ?') == \
        'He said "so" and left (quickly) . See http://a.com for $5?'  # " ." joins only a word (\w+ \.)
    assert dt.lm1b("costs \N{POUND SIGN} 3 ; [ sic ] : no / yes") == "costs \N{POUND SIGN}3; [sic]: no/yes"
    assert dt.detokenize("ag_news", "left  as  is .") == "left  as  is ."


# ---------------------------------------------------------------------------------------------- protocols

class CharTok:
    """One id per character (its code point), so token and byte counts are known by construction."""

    def __init__(self, bos_id=None, eos_id=None):
        self.bos_id, self.eos_id = bos_id, eos_id
        self.fingerprint, self.vocab_size = "chars", 0x110000

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_protocol_counts_by_hand():
    """Rows of 5, 0, 3 and 9 characters; seq_len 6 (4 content ids per block), EOS 2 = BOS.
    mdlm: stream 5+1 + 0+1 + 3+1 + 9+1 = 21 ids -> 5 blocks, 5 * 6 = 30 scored.
    bd3lms: stream 17 ids -> 4 blocks, 4 * 5 = 20 scored (BOS not)."""
    docs = ["abcde", "", "fgh", "ijklmnopq"]
    tok = CharTok(None, 2)
    m = tokenize_and_wrap(docs, tok, 6, protocol=get_protocol("mdlm"))
    assert m.counts() == {"rows": 4, "stream_tokens": 21, "text_tokens": 17, "blocks": 5, "scored_tokens": 30}
    E = 2
    assert m.tokens[0] == [E, *map(ord, "abcd"), E] and m.tokens[1] == [E, ord("e"), E, E, ord("f"), E]
    assert m.maskable() is None
    b = tokenize_and_wrap(docs, tok, 6, protocol=get_protocol("bd3lms"))
    assert b.counts() == {"rows": 4, "stream_tokens": 17, "text_tokens": 17, "blocks": 4, "scored_tokens": 20}
    # nothing between documents: the stream is the documents' characters back to back
    assert [t for r in b.tokens for t in r[1:-1]] == [ord(c) for c in "abcdefghijklmnop"]
    assert b.maskable()[0] == [False] + [True] * 5


def test_wrap_groups_of_rows_like_the_reference():
    """The reference wraps each datasets.map batch (1000 rows) on its own; rows_per_wrap=2 shows the rule on 4
    rows: groups "abcde"+"" (6 ids with EOS -> 1 block, 2 dropped) and "fgh"+"ijklmnopq" (14 -> 3 blocks)."""
    docs = ["abcde", "", "fgh", "ijklmnopq"]
    g = tokenize_and_wrap(docs, CharTok(None, 2), 6, protocol=get_protocol("mdlm", rows_per_wrap=2))
    assert g.n_blocks == 4 and g.n_stream_tokens == 21
    assert g.tokens[1] == [2, *map(ord, "fgh"), 2, 2]
    # num_proc shards: 4 rows over 3 shards -> rows [0, 1], [2], [3], each wrapped on its own
    s = tokenize_and_wrap(docs, CharTok(None, 2), 6, protocol=get_protocol("mdlm", wrap_shards=3))
    assert s.n_blocks == 1 + 1 + 2
    whole = tokenize_and_wrap(docs, CharTok(None, 2), 6, protocol=get_protocol("mdlm", rows_per_wrap=0))
    assert whole.n_blocks == 21 // 4
    with pytest.raises(ValueError):
        get_protocol("gpt2")


def test_wrap_block_content_and_plain_blocks():
    docs = ["abcde", "fgh", "ijklmnopq"]  # 17 tokens
    stream = [ord(c) for c in "".join(docs)]
    b = tokenize_and_wrap(docs, CharTok(1, 2), seq_len=6)
    assert b.n_blocks == 17 // 4 and b.content_per_block == 4  # [BOS] + 4 + [EOS], remainder of 1 dropped
    assert b.tokens == [[1] + stream[i:i + 4] + [2] for i in range(0, 16, 4)]
    assert b.covered_bytes == 16 and b.total_bytes == 17 and b.n_text_tokens == 17
    # no special ids (the synthetic language): plain blocks of seq_len
    b = tokenize_and_wrap(docs, CharTok(), seq_len=6)
    assert b.n_blocks == 2 and b.tokens == [stream[:6], stream[6:12]] and b.covered_bytes == 12
    blocks, _ = wrap([[ord(c) for c in d] for d in docs], 6, bos_id=1, eos_id=2, doc_eos=True)
    assert len(blocks) == 5 and blocks[1] == [1, ord("e"), 2, ord("f"), ord("g"), 2]


def test_covered_bytes_cut_inside_a_document_counts_utf8():
    docs = ["h\u00e9llo", "w\u00f6rld!"]  # 5 + 6 characters, two of them 2 bytes in UTF-8
    b = tokenize_and_wrap(docs, CharTok(1, 2), seq_len=9)  # content 7: "héllo" + "wö"
    assert b.n_blocks == 1
    assert b.covered_bytes == len("h\u00e9llow\u00f6".encode()) == 9
    assert b.total_bytes == 13
    m = tokenize_and_wrap(docs, CharTok(1, 2), seq_len=9, protocol=get_protocol("mdlm"))  # "héllo" EOS "w"
    assert m.covered_bytes == len("h\u00e9llow".encode())


@pytest.mark.skipif(not (SHARED / "ptb" / "ptb.valid.txt").is_file(), reason="../shared/data not present")
def test_wrap_count_on_a_real_file():
    corpus = load_corpus("ptb", "validation", str(SHARED), hub=False)
    assert len(corpus.docs) == 3370 and not corpus.docs[0].endswith("\n")  # one stripped sentence a row
    b = tokenize_and_wrap(corpus.docs, CharTok(0, 0), seq_len=1024, protocol=get_protocol("bd3lms", rows_per_wrap=0))
    assert b.n_blocks == sum(len(d) for d in corpus.docs) // 1022 and b.covered_bytes == b.n_blocks * 1022


@pytest.mark.skipif(not (SHARED / "gpt2-tokenizer" / "vocab.json").is_file(), reason="../shared/data not present")
def test_gpt2_counts_of_the_shared_sets_equal_the_reference_codes():
    """Numbers produced by running the reference's own get_dataset (mdlm and bd3lms dataloader.py, one process)
    on these files with GPT-2's tokenizer: blocks 77 / 232 / 417 (mdlm), 74 / 228 / 412 (insert_valid_eos=False)."""
    from eval.ppl import main
    rows, failed = main(["--counts-only", "--tokenizer", str(SHARED / "gpt2-tokenizer"), "--data-dir", str(SHARED),
                         "--datasets", "ptb,wikitext2,lambada", "--offline"])
    assert not failed
    got = {r["dataset"]: (r["rows"], r["stream_tokens"], r["blocks"], r["scored_tokens"]) for r in rows}
    assert got == {"ptb": (3370, 81773, 77, 78848), "wikitext2": (3760, 239912, 232, 237568),
                   "lambada": (5153, 428743, 417, 427008)}
    rows, _ = main(["--counts-only", "--tokenizer", str(SHARED / "gpt2-tokenizer"), "--data-dir", str(SHARED),
                    "--datasets", "ptb,wikitext2,lambada", "--offline", "--protocol", "bd3lms"])
    got = {r["dataset"]: (r["stream_tokens"], r["blocks"], r["scored_tokens"]) for r in rows}
    assert got == {"ptb": (78403, 74, 75702), "wikitext2": (236152, 228, 233244), "lambada": (423590, 412, 421476)}


# ---------------------------------------------------------------------------------------------- corpora

def _layout(root: Path):
    (root / "ptb").mkdir(parents=True)
    (root / "ptb" / "ptb.valid.txt").write_text(" it 's a test \n we were n't there \n")
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "wiki.valid.tokens").write_text(" \n = Title = \n \n Some text @-@ here . \n")
    (root / "wikitext-2-raw").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("\r\n = Raw = \r\n\r\n Raw body , ok . \r\n")
    (root / "ag_news").mkdir()
    (root / "ag_news" / "test.csv").write_text('"3","Wall St. Bears","Short-sellers are back."\n'
                                                '"4","New chip","It is fast."\n')
    (root / "lambada").mkdir()
    (root / "lambada" / "lambada_test.jsonl").write_text(json.dumps({"text": "\u201cHi\u201d he said"}) + "\n" +
                                                         json.dumps({"text": "Bye now"}) + "\n")


def test_local_corpora(tmp_path):
    _layout(tmp_path)
    c = load_corpus("ptb", None, str(tmp_path), hub=False)
    assert c.split == "validation" and c.docs == ["it's a test", "we weren't there"]  # nothing appended
    c = load_corpus("wikitext2", "validation", str(tmp_path), hub=False)  # no raw valid: tokenized version
    assert c.source.endswith("wiki.valid.tokens") and c.docs == ["", " = Title =\n", "", " Some text-here.\n"]
    c = load_corpus("wikitext2", "test", str(tmp_path), hub=False)  # raw preferred, CRLF read as LF
    assert c.source.endswith("wiki.test.raw") and c.docs == ["", " = Raw =\n", "", " Raw body, ok.\n"]
    c = load_corpus("ag_news", None, str(tmp_path), hub=False)
    assert c.split == "test" and c.docs == ["Wall St. Bears Short-sellers are back.", "New chip It is fast."]
    c = load_corpus("lambada", None, str(tmp_path), hub=False)
    assert c.docs == ['\n"Hi" he said', "\nBye now"]


def test_wikitext_file_rows_equal_the_hub_rows(tmp_path):
    """The hub's `wikitext` builder yields one row per line of the raw file: the line itself (with its '\n')
    when it has text, '' when blank. A file written from such rows reads back as exactly those rows."""
    hub_rows = ["", " = Valkyria = \n", "", " Senj\u014d no Valkyria 3 : Unrecorded \n", "", "", " = = Gameplay = = \n", ""]
    raw = "".join(r if r else " \n" for r in hub_rows)  # the file layout: blank lines are a single space
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.valid.raw").write_text(raw, encoding="utf-8")
    from eval.corpora import _read_wikitext
    assert _read_wikitext(tmp_path / "wikitext-2-raw" / "wiki.valid.raw") == hub_rows
    c = load_corpus("wikitext2", "validation", str(tmp_path), hub=False)
    assert c.docs == [dt.wikitext(r) for r in hub_rows] and len(c.docs) == 8


def test_missing_split_lists_what_was_found(tmp_path):
    _layout(tmp_path)
    with pytest.raises(CorpusError) as e:
        load_corpus("ptb", "test", str(tmp_path), hub=False)
    assert "ptb/ptb.test.txt" in str(e.value) and "ptb/ptb.valid.txt" in str(e.value)
    with pytest.raises(CorpusError) as e:
        load_corpus("wikitext2", "train", str(tmp_path), hub=False)
    msg = str(e.value)
    assert "wikitext-2-raw/wiki.test.raw" in msg and "wikitext-2/wiki.valid.tokens" in msg


def test_offline_hub_fails_fast(tmp_path, monkeypatch):
    _layout(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network from tests
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    t0 = time.perf_counter()
    with pytest.raises(CorpusError) as e:
        load_corpus("ptb", "test", str(tmp_path), hub=True)
    assert time.perf_counter() - t0 < 20
    assert "ptb/ptb.valid.txt" in str(e.value) and "hub" in str(e.value)


# ---------------------------------------------------------------------------------------------- command line

def _bpe_run(root: Path, text: str, causal=False) -> Path:
    """A run directory in the export layout (config.yaml + model.safetensors + tokenizer.json) with a small
    byte-level BPE, so English text can be evaluated without a trained English model."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data.tokenizer import TextTokenizer
    from model import Transformer
    from pretrain.config import load_config, save_config
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "[MASK]"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tt = TextTokenizer(tok, mask_id=tok.token_to_id("[MASK]"), eos_id=tok.token_to_id("<|endoftext|>"))
    run = root / ("ar" if causal else "mdm")
    cfg = load_config("configs/tiny.yaml", [f"model.vocab_size={tt.vocab_size}", f"model.mask_id={tt.mask_id}",
                                            "model.max_seq_len=64", f"model.causal={str(causal).lower()}",
                                            f"diffusion.objective={'ar' if causal else 'mdm'}"])
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    tt.save(run)
    torch.manual_seed(0)
    m = Transformer(cfg.model)
    m.init_weights(seed=0)
    save_file(m.state_dict(), str(run / "model.safetensors"))
    return run


def test_cli_on_english_text_with_bits_per_byte(tmp_path):
    from eval.ppl import main
    _layout(tmp_path / "data")
    text = (tmp_path / "data" / "ptb" / "ptb.valid.txt")
    text.write_text(" it 's a test of the unmask harness \n" * 40)
    run = _bpe_run(tmp_path, "it's a test of the unmask harness\n" * 20 + "Raw body, ok. Title")
    rows, failed = main(["--ckpt", str(run), "--datasets", "ptb,wikitext2,lm1b", "--data-dir", str(tmp_path / "data"),
                         "--seq-len", "32", "--samples", "2", "--method", "mdlm,count", "--offline", "--no-progress"])
    assert failed == ["wikitext2", "lm1b"]  # wikitext2: 1 doc, fewer tokens than a block -> skipped; lm1b: no file
    assert [r["method"] for r in rows] == ["mdlm", "count"]
    from data.tokenizer import TextTokenizer
    tok = TextTokenizer.load(run)
    n_stream = (len(tok.encode("it's a test of the unmask harness")) + 1) * 40  # mdlm: each row + EOS
    for r in rows:
        assert r["stream_tokens"] == n_stream and r["rows"] == 40 and r["protocol"] == "mdlm"
        assert r["blocks"] == n_stream // 30 and r["n_tokens"] == r["scored_tokens"] == r["blocks"] * 32
        assert r["bos_id"] == tok.eos_id and r["tokenizer"] == tok.fingerprint and r["weights"] == "raw"
        assert r["bits_per_byte"] == pytest.approx(r["total_nats"] / math.log(2) / r["covered_bytes"])
        assert r["ppl"] == pytest.approx(math.exp(r["nelbo"])) and r["samples"] == 2 and r["stderr"] > 0
    saved = json.loads((run / "eval" / "ppl.json").read_text())["results"]
    assert len(saved) == 2 and "| ptb | validation | mdlm | raw | count | 2 |" in (run / "eval" / "ppl.md").read_text()


def test_cli_bd3lms_protocol_scores_all_but_bos(tmp_path):
    from eval.ppl import main
    _layout(tmp_path / "data")
    (tmp_path / "data" / "ptb" / "ptb.valid.txt").write_text(" it 's a test of the unmask harness \n" * 40)
    run = _bpe_run(tmp_path, "it's a test of the unmask harness\n" * 20)
    rows, _ = main(["--ckpt", str(run), "--datasets", "ptb", "--data-dir", str(tmp_path / "data"), "--seq-len", "32",
                    "--protocol", "bd3lms", "--offline", "--no-progress", "--method", "count", "--samples", "2"])
    (r,) = rows
    from data.tokenizer import TextTokenizer
    n_stream = len(TextTokenizer.load(run).encode("it's a test of the unmask harness")) * 40  # nothing between rows
    assert r["protocol"] == "bd3lms" and r["stream_tokens"] == n_stream and r["blocks"] == n_stream // 30
    assert r["n_tokens"] == r["scored_tokens"] == r["blocks"] * 31
    assert "bd3lms" in (run / "eval" / "ppl.md").read_text()


def test_cli_ar_checkpoint_is_exact(tmp_path):
    from eval.ppl import main
    _layout(tmp_path / "data")
    (tmp_path / "data" / "ptb" / "ptb.valid.txt").write_text(" the cat sat on the mat \n" * 30)
    run = _bpe_run(tmp_path, "the cat sat on the mat\n" * 10, causal=True)
    rows, _ = main(["--ckpt", str(run), "--datasets", "ptb", "--data-dir", str(tmp_path / "data"), "--seq-len", "16",
                    "--offline", "--no-progress", "--out", str(tmp_path / "out")])
    (r,) = rows
    assert r["method"] == "ar" and r["stderr"] == 0 and r["n_tokens"] == r["blocks"] * 15 and not r["bound"]
    assert (tmp_path / "out" / "ppl.json").is_file()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    from pretrain.config import load_config
    from pretrain.loop.train import train
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={out}", "train.name=proto", "train.steps=10",
                                            "train.samples=0", "train.eval_every=1000", "logging.progress_bar=false",
                                            "data.seq_len=32"])
    return Path(train(cfg)["run_dir"])


def test_same_result_on_one_and_two_ranks(synthetic_run, tmp_path):
    """Noise is a function of (seed, block, sample), so 2 gloo ranks must reproduce the 1-rank number."""
    from eval.ppl import main
    args = ["--ckpt", str(synthetic_run), "--datasets", "synthetic", "--seq-len", "32", "--max-blocks", "10",
            "--samples", "3", "--method", "mdlm,count", "--device", "cpu", "--no-progress"]
    one, _ = main(args + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "eval.ppl", *args, "--out", str(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "ppl.json").read_text())["results"]
    by = {r["method"]: r for r in two}
    for r in one:
        s = by[r["method"]]
        assert s["n_sequences"] == r["n_sequences"] == 10 and s["n_tokens"] == r["n_tokens"]
        assert abs(s["total_nats"] - r["total_nats"]) <= 1e-6 * r["total_nats"]  # same noise, same sums
        assert abs(s["nelbo"] - r["nelbo"]) < r["stderr"]  # and trivially within the error
        assert s["stderr"] == pytest.approx(r["stderr"], rel=1e-6)
