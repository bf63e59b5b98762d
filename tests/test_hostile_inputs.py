"""Hostile inputs, tried on purpose, for `prepare`, `pretrain`, `finetune`, `rl`, `convert`, `generate` and
`evaluate`: empty, truncated, binary, wrong encoding, wrong fields and types, duplicate keys, deeply nested JSON
in every kind of JSON gptds reads, blank documents and records, huge lines, DeepSpeed configs with wrong types (strings
or numbers where DeepSpeed expects booleans, and the reverse), unknown keys or a missing NVMe path, zero,
negative, non-finite and out-of-range numbers for flags, blank paths, outputs that overlap their inputs,
damaged checkpoints and malformed evaluation items. Each must end with exit status 2 and one line on stderr,
`gptds <command>: error: ...`, that names what is wrong (the file, line or byte offset, field or flag); no
traceback; and nothing half-written left behind: the output never appears, the inputs are unchanged, and no
staging or temp file stays. With $GPTDS_RELIABILITY_REPORT set (bench/reliability.py sets it) the counts go
there (tests/reliability_report.py)."""

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import fake_checkpoint
from reliability_report import figures_fixture

from gptds.__main__ import main
from gptds.tokenizer import ASSETS_DIR

FIGURES = {"inputs_tried": 0, "inputs_refused_cleanly": 0, "inputs_accepted_correctly": 0, "data_lost": 0,
           "inputs": []}
report = figures_fixture("hostile_inputs", FIGURES)
TRAIN = ["--model", "tiny", "-B", "2", "-T", "32", "--max_steps", "1", "--eval_interval", "0", "--generate_interval",
         "0", "--hellaswag_interval", "0"]


# ---------------------------------------------------------------- the inputs: (file name, bytes)

def dolly(**fields) -> bytes:
    record = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}
    return (json.dumps({**record, **fields}) + "\n").encode()


HF_CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 50257}
DEEP = "[" * 5000 + "]" * 5000  # nesting beyond the parser's recursion limit


def eval_item(**fields) -> bytes:
    return (json.dumps({"ctx": "A man sits down.", "endings": ["He eats.", "He runs.", "He sleeps.", "He sings."],
                        "label": 1, **fields}) + "\n").encode()
RNG = random.Random(0)
BINARY = bytes(RNG.randrange(256) for _ in range(4096))

FILES = {
    "empty.txt": b"",
    "empty.jsonl": b"",
    "binary.txt": BINARY,
    "latin1.txt": "Caf\u00e9 au lait, na\u00efve ROMEO.\n".encode("latin-1"),
    "truncated.jsonl": b'{"text": "first document"}\n{"text": "second docu',
    "no_text_field.jsonl": b'{"body": "hello"}\n',
    "text_not_string.jsonl": b'{"text": 42}\n',
    "not_json.jsonl": b"just a line of prose\n",
    "binary.parquet": BINARY,
    "dolly_no_response.jsonl": b'{"instruction": "a", "context": "", "category": "x"}\n',
    "dolly_list_instruction.jsonl": dolly(instruction=["a", "list"]),
    "dolly_number_response.jsonl": dolly() + dolly(response=42),
    "alpaca_truncated.json": b'[{"instruction": "a", "input": "", "output": "b"}, {"instr',
    "alpaca_object.json": b'{"instruction": "a", "input": "", "output": "b"}',
    "ds_truncated.json": b'{"zero_optimization": {"stage": 2',
    "ds_binary.json": BINARY,
    "ds_list.json": b'[{"zero_optimization": {"stage": 2}}]',
    "ds_stage_word.json": b'{"zero_optimization": {"stage": "two"}}',
    "ds_unknown_key.json": b'{"zero_optimisation": {"stage": 2}}',
    "ds_unknown_nested_key.json": b'{"zero_optimization": {"stage": 2, "overlap_commm": true}}',
    "ds_wrong_type.json": b'{"zero_optimization": {"stage": 2, "overlap_comm": "yes please"}}',
    "ds_negative_micro_batch.json": b'{"train_micro_batch_size_per_gpu": -1}',
    "ds_optimizer_block.json": b'{"optimizer": {"type": "Adam", "params": {"lr": 0.001}}}',
    "garbage.safetensors": BINARY,
    "hf_binary_config/config.json": BINARY,
    "hf_missing_field/config.json": json.dumps({k: v for k, v in HF_CONFIG.items() if k != "n_embd"}).encode(),
    "hf_wrong_type/config.json": json.dumps({**HF_CONFIG, "n_layer": "two"}).encode(),
    "hf_truncated_weights/config.json": json.dumps(HF_CONFIG).encode(),
    "hf_truncated_weights/model.safetensors": BINARY[:1000],
    "hf_binary_bin/config.json": json.dumps(HF_CONFIG).encode(),
    "hf_binary_bin/pytorch_model.bin": BINARY,
    "not_a_checkpoint/step_00000004/something.pt": BINARY,
    "empty_dir/.keep": b"",
    # deeply nested JSON, in every kind of JSON file gptds reads
    "deep.jsonl": ('{"text": ' + DEEP + '}\n').encode(),
    "deep_array.json": ('[{"instruction": "a", "input": "", "output": ' + DEEP + '}]').encode(),
    "deep_ds.json": ('{"zero_optimization": ' + DEEP + '}').encode(),
    "deep_eval.jsonl": ('{"ctx": ' + DEEP + '}\n').encode(),
    "hf_deep/config.json": ('{"model_type": ' + DEEP + '}').encode(),
    "index_deep/model.safetensors.index.json": ('{"weight_map": ' + DEEP + '}').encode(),
    # a key twice in one record: JSON readers keep the last value without a word
    "dup.jsonl": b'{"text": "first", "text": "second"}\n',
    "dolly_dup.jsonl": b'{"instruction": "a", "context": "", "response": "b", "response": "c"}\n',
    # blank documents and records
    "blank.txt": b" \n\t  \r\n   \n",
    "nul.txt": b"\0" * 5000,
    "blank_docs.jsonl": b'{"text": "   \\n "}\n{"text": "\\u0000\\u0000\\t"}\n',
    "dolly_blank.jsonl": dolly(instruction=" \t", response="\0\0", context="  ", category=""),
    # evaluation items
    "eval_list.jsonl": eval_item() + b"[1, 2]\n",
    "eval_bool_label.jsonl": eval_item(label=True),
    "eval_empty_ending.jsonl": eval_item(endings=["He eats.", "", "He sleeps.", "He sings."]),
    "eval_blank_ctx.jsonl": eval_item(ctx=" \n "),
    "eval_number_ending.jsonl": eval_item(endings=["He eats.", 4, "He sleeps.", "He sings."]),
    "eval_dup.jsonl": b'{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 0, "label": 2}\n',
    # DeepSpeed configs whose values DeepSpeed would reinterpret, or whose NVMe path is missing
    "ds_bf16_string.json": b'{"bf16": {"enabled": "false"}}',
    "ds_fp16_number.json": b'{"fp16": {"enabled": 1}}',
    "ds_overlap_string.json": b'{"zero_optimization": {"stage": 2, "overlap_comm": "false"}}',
    "ds_bucket_bool.json": b'{"zero_optimization": {"stage": 2, "reduce_bucket_size": true}}',
    "ds_steps_string.json": b'{"steps_per_print": "10"}',
    "ds_pin_number.json": b'{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", '
                          b'"pin_memory": 1}}}',
    "ds_nvme_no_path.json": b'{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}',
    "ds_nvme_absent.json": b'{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", '
                           b'"nvme_path": "/nonexistent/nvme"}}}',
    # numbers that are not finite, configs no GPT can be built from
    "hf_nan/config.json": json.dumps(HF_CONFIG).replace('"vocab_size": 50257', '"vocab_size": 50257, '
                                                        '"layer_norm_epsilon": NaN').encode(),
    "hf_indivisible/config.json": json.dumps({**HF_CONFIG, "n_head": 3}).encode(),
    "hf_epsilon_string/config.json": json.dumps({**HF_CONFIG, "layer_norm_epsilon": "1e-5"}).encode(),
    "ds_infinite.json": b'{"zero_optimization": {"stage": 2, "reduce_bucket_size": Infinity}}',
    # RL prompts (GSM8K's layout)
    "rl_no_hashes.jsonl": b'{"question": "What is 1 + 1?", "answer": "#### 2"}\n{"question": "Q?", "answer": "2"}\n',
    "rl_list_question.jsonl": b'{"question": ["What", "is"], "answer": "#### 2"}\n',
    "rl_deep.jsonl": ('{"question": "Q?", "answer": ' + DEEP + '}\n').encode(),
    "rl_long.jsonl": (json.dumps({"question": "one " * 300, "answer": "#### 1"}) + "\n").encode(),
    # inputs that outputs must not overlap
    "corpus/a.txt": b"Some text to prepare.\n",
    "dolly_dir/records.jsonl": dolly(),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, text_data):
    root = tmp_path_factory.mktemp("hostile")
    for name, content in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    # prepared datasets, damaged afterwards
    for damage in ("truncated_shard", "truncated_manifest", "binary_manifest", "manifest_list"):
        shutil.copytree(text_data, root / damage)
    train_shard = sorted((root / "truncated_shard").glob("train_*.bin"))[0]
    train_shard.write_bytes(train_shard.read_bytes()[:1001])
    manifest = (root / "truncated_manifest" / "manifest.json")
    manifest.write_text(manifest.read_text()[:200])
    (root / "binary_manifest" / "manifest.json").write_bytes(BINARY)
    (root / "manifest_list" / "manifest.json").write_text("[1, 2, 3]")
    for damage in ("deep_manifest", "dup_manifest"):
        shutil.copytree(text_data, root / damage)
    (root / "deep_manifest" / "manifest.json").write_text('{"format": ' + DEEP + "}")
    manifest = (root / "dup_manifest" / "manifest.json")
    manifest.write_text(manifest.read_text().replace('"kind": "text",', '"kind": "text", "kind": "instruct",'))
    # checkpoints: intact (to convert onto itself), damaged in place, meta.json field renamed or nested too deep
    for name in ("ckpt", "ckpt_damaged", "ckpt_renamed", "ckpt_deep_meta"):
        fake_checkpoint(root / name, 1, BINARY)
    shard = root / "ckpt_damaged" / "step_00000001" / "shard.pt"
    with open(shard, "r+b") as f:  # bytes overwritten inside, the size unchanged
        f.seek(100)
        f.write(b"\xff" * 16)
    meta = root / "ckpt_renamed" / "step_00000001" / "meta.json"
    meta.write_text(meta.read_text().replace('"model_config"', '"model_cfg"'))
    (root / "ckpt_deep_meta" / "step_00000001" / "meta.json").write_text('{"format": ' + DEEP + "}")
    return root


# ---------------------------------------------------------------- the cases: argv, what the error must name

IN, OUT = "{in}", "{out}"
CASES = {
    # prepare text
    "text: empty file": (["prepare", "text", "--input", IN + "/empty.txt", "--output_dir", OUT],
                         r"no documents in \S+empty\.txt: the input is empty"),
    "text: empty jsonl": (["prepare", "text", "--input", IN + "/empty.jsonl", "--output_dir", OUT],
                          r"no documents in \S+empty\.jsonl"),
    "text: binary": (["prepare", "text", "--input", IN + "/binary.txt", "--output_dir", OUT],
                     r"binary\.txt: not UTF-8 text at byte offset 0"),
    "text: latin-1": (["prepare", "text", "--input", IN + "/latin1.txt", "--output_dir", OUT],
                      r"latin1\.txt: not UTF-8 text at byte offset 3"),
    "text: truncated jsonl": (["prepare", "text", "--input", IN + "/truncated.jsonl", "--output_dir", OUT],
                              r"truncated\.jsonl:2: malformed JSON"),
    "text: missing field": (["prepare", "text", "--input", IN + "/no_text_field.jsonl", "--output_dir", OUT],
                            r"no_text_field\.jsonl:1: record has no field 'text' \(fields: body\)"),
    "text: wrong field type": (["prepare", "text", "--input", IN + "/text_not_string.jsonl", "--output_dir", OUT],
                               r"text_not_string\.jsonl:1: field 'text' must be a string, got int"),
    "text: prose in a jsonl": (["prepare", "text", "--input", IN + "/not_json.jsonl", "--output_dir", OUT],
                               r"not_json\.jsonl:1: malformed JSON"),
    "text: binary parquet": (["prepare", "text", "--input", IN + "/binary.parquet", "--output_dir", OUT],
                             r"binary\.parquet: not a readable parquet file"),
    "text: missing input": (["prepare", "text", "--input", IN + "/nothing-here.txt", "--output_dir", OUT],
                            r"input \S+nothing-here\.txt does not exist"),
    "text: zero shard size": (["prepare", "text", "--input", IN + "/latin1.txt", "--output_dir", OUT,
                               "--shard_size", "0"], r"--shard_size \(prepare_text\.shard_size\) = 0 is not allowed"),
    "text: negative val fraction": (["prepare", "text", "--input", IN + "/latin1.txt", "--output_dir", OUT,
                                     "--val_fraction", "-0.5"], r"--val_fraction .* = -0\.5 is not allowed"),
    # prepare dolly
    "dolly: missing field": (["prepare", "dolly", "--input", IN + "/dolly_no_response.jsonl", "--output_dir", OUT],
                             r"dolly_no_response\.jsonl:1: cannot tell the record layout from its fields"),
    "dolly: list instead of text": (["prepare", "dolly", "--input", IN + "/dolly_list_instruction.jsonl",
                                     "--output_dir", OUT],
                                    r"dolly_list_instruction\.jsonl:1: field 'instruction' must be a string, got list"),
    "dolly: number field on line 2": (["prepare", "dolly", "--input", IN + "/dolly_number_response.jsonl",
                                       "--output_dir", OUT],
                                      r"dolly_number_response\.jsonl:2: field 'response' must be a string, got int"),
    "dolly: truncated array": (["prepare", "dolly", "--input", IN + "/alpaca_truncated.json", "--output_dir", OUT],
                               r"alpaca_truncated\.json:1: malformed JSON"),
    "dolly: object instead of array": (["prepare", "dolly", "--input", IN + "/alpaca_object.json",
                                        "--output_dir", OUT], r"alpaca_object\.json"),
    "dolly: empty": (["prepare", "dolly", "--input", IN + "/empty.jsonl", "--output_dir", OUT],
                     r"empty\.jsonl"),
    "dolly: zero context": (["prepare", "dolly", "--input", str(ASSETS_DIR / "dolly_sample.jsonl"), "--output_dir",
                             OUT, "--context_length", "0"], r"--context_length .* = 0 is not allowed"),
    # pretrain / finetune: DeepSpeed configs
    "ds config: truncated": (["pretrain", "--deepspeed_config", IN + "/ds_truncated.json"],
                             r"ds_truncated\.json:1:34: invalid JSON"),
    "ds config: binary": (["pretrain", "--deepspeed_config", IN + "/ds_binary.json"],
                          r"ds_binary\.json: not UTF-8 text at byte offset"),
    "ds config: a list": (["pretrain", "--deepspeed_config", IN + "/ds_list.json"],
                          r"ds_list\.json: expected a DeepSpeed JSON config, got a JSON list"),
    "ds config: stage as a word": (["pretrain", "--deepspeed_config", IN + "/ds_stage_word.json"],
                                   r"ds_stage_word\.json: zero_optimization\.stage = 'two'"),
    "ds config: unknown key": (["pretrain", "--deepspeed_config", IN + "/ds_unknown_key.json"],
                               r"ds_unknown_key\.json: unknown top-level key 'zero_optimisation' \(did you mean "
                               r"'zero_optimization'\?\)"),
    "ds config: unknown nested key": (["pretrain", "--deepspeed_config", IN + "/ds_unknown_nested_key.json"],
                                      r"ds_unknown_nested_key\.json: DeepSpeed rejects this config: .*overlap_commm"),
    "ds config: wrong type": (["pretrain", "--deepspeed_config", IN + "/ds_wrong_type.json"],
                              r"ds_wrong_type\.json: DeepSpeed rejects this config: .*overlap_comm"),
    "ds config: negative micro batch": (["pretrain", "--deepspeed_config", IN + "/ds_negative_micro_batch.json"],
                                        r"train_micro_batch_size_per_gpu = -1 conflicts with --micro_batch_size 2"),
    "ds config: optimizer block": (["finetune", "--deepspeed_config", IN + "/ds_optimizer_block.json"],
                                   r"ds_optimizer_block\.json: remove the \"optimizer\" block"),
    "ds config: missing": (["pretrain", "--deepspeed_config", IN + "/nothing.json"], r"nothing\.json"),
    # pretrain / finetune: flags and data
    "train: zero batch": (["pretrain", "-B", "0"], r"--micro_batch_size \(data\.micro_batch_size\) = 0 is not allowed"),
    "train: negative context": (["pretrain", "-T", "-8"], r"--context_length \(data\.context_length\) = -8"),
    "train: negative lr": (["finetune", "--lr", "-0.1"], r"--lr \(train\.lr\) = -0\.1 is not allowed"),
    "train: zero steps": (["pretrain", "--max_steps", "0"], r"--max_steps \(train\.max_steps\) = 0 is not allowed"),
    "train: zero accumulation": (["pretrain", "--grad_accum_steps", "0"], r"--grad_accum_steps .* = 0"),
    "train: negative keep": (["pretrain", "--keep_last_n_checkpoints", "-3"], r"--keep_last_n_checkpoints .* = -3"),
    "data: truncated shard": (["pretrain", "--data_dir", IN + "/truncated_shard"],
                              r"train_000000\.bin: 1001 bytes, but \S+manifest\.json says \d+ tokens"),
    "data: truncated manifest": (["pretrain", "--data_dir", IN + "/truncated_manifest"],
                                 r"truncated_manifest/manifest\.json: not valid JSON"),
    "data: binary manifest": (["pretrain", "--data_dir", IN + "/binary_manifest"],
                              r"binary_manifest/manifest\.json: not valid JSON"),
    "data: manifest of a list": (["pretrain", "--data_dir", IN + "/manifest_list"],
                                 r"manifest_list/manifest\.json: not a gptds manifest"),
    "data: not a dataset": (["pretrain", "--data_dir", IN + "/empty_dir"], r"empty_dir has no manifest\.json"),
    "finetune: text data": (["finetune", "--data_dir", "{text_data}"],
                            r"holds 'text' data; `gptds finetune` needs data from `gptds prepare chat` or "
                            r"`gptds prepare dolly`"),
    "finetune: garbage weights": (["finetune", "--pretrained_checkpoint", IN + "/garbage.safetensors"],
                                  r"garbage\.safetensors: not a readable safetensors file, or truncated"),
    "finetune: config without a field": (["finetune", "--pretrained_checkpoint", IN + "/hf_missing_field"],
                                         r"hf_missing_field/config\.json: field 'n_embd' is missing"),
    # convert and generate
    "convert: empty folder": (["convert", "zero-to-fp32", IN + "/empty_dir", OUT],
                              r"empty_dir: no complete checkpoint here"),
    "convert: incomplete step": (["convert", "zero-to-hf", IN + "/not_a_checkpoint", OUT],
                                 r"not_a_checkpoint"),
    "convert: a file as checkpoint": (["convert", "zero-to-universal", IN + "/binary.txt", OUT], r"binary\.txt"),
    "convert: binary config.json": (["convert", "hf-to-gptds", IN + "/hf_binary_config", OUT + ".safetensors"],
                                    r"hf_binary_config/config\.json: not UTF-8 text at byte offset"),
    "convert: config field of a wrong type": (["convert", "hf-to-gptds", IN + "/hf_wrong_type", OUT + ".safetensors"],
                                              r"hf_wrong_type/config\.json: field 'n_layer' is 'two'"),
    "convert: truncated safetensors": (["convert", "hf-to-gptds", IN + "/hf_truncated_weights",
                                        OUT + ".safetensors"],
                                       r"hf_truncated_weights/model\.safetensors: not a readable safetensors file"),
    "convert: binary pytorch_model.bin": (["convert", "hf-to-gptds", IN + "/hf_binary_bin", OUT + ".safetensors"],
                                          r"hf_binary_bin/pytorch_model\.bin: not a readable PyTorch weights file"),
    "generate: garbage weights": (["generate", "--checkpoint", IN + "/garbage.safetensors", "--prompt", "Hi"],
                                  r"garbage\.safetensors: not a readable safetensors file"),
    # deeply nested JSON, in each kind of JSON gptds reads
    "deep: a JSONL record": (["prepare", "text", "--input", IN + "/deep.jsonl", "--output_dir", OUT],
                             r"deep\.jsonl:1: JSON nested too deeply"),
    "deep: a JSON array record": (["prepare", "dolly", "--input", IN + "/deep_array.json", "--output_dir", OUT],
                                  r"deep_array\.json:1: JSON nested too deeply"),
    "deep: a DeepSpeed config": (["pretrain", "--deepspeed_config", IN + "/deep_ds.json"],
                                 r"deep_ds\.json: JSON nested too deeply"),
    "deep: a manifest": (["pretrain", "--data_dir", IN + "/deep_manifest"],
                         r"deep_manifest/manifest\.json: JSON nested too deeply"),
    "deep: a Hugging Face config": (["finetune", "--pretrained_checkpoint", IN + "/hf_deep"],
                                    r"hf_deep/config\.json: JSON nested too deeply"),
    "deep: a safetensors index": (["generate", "--checkpoint", IN + "/index_deep", "--prompt", "Hi"],
                                  r"model\.safetensors\.index\.json: JSON nested too deeply"),
    "deep: an evaluation item": (["evaluate", "--checkpoint", IN + "/garbage.safetensors", "--hellaswag_file",
                                  IN + "/deep_eval.jsonl"], r"deep_eval\.jsonl:1: JSON nested too deeply"),
    "deep: a checkpoint's meta.json": (["convert", "zero-to-fp32", IN + "/ckpt_deep_meta", OUT],
                                       r"ckpt_deep_meta: no complete and intact checkpoint here .*JSON nested too "
                                       r"deeply"),
    # a key twice in one object
    "duplicate key: a text record": (["prepare", "text", "--input", IN + "/dup.jsonl", "--output_dir", OUT],
                                     r"dup\.jsonl:1: key 'text' appears twice"),
    "duplicate key: a Dolly record": (["prepare", "dolly", "--input", IN + "/dolly_dup.jsonl", "--output_dir", OUT],
                                      r"dolly_dup\.jsonl:1: key 'response' appears twice"),
    "duplicate key: a manifest": (["pretrain", "--data_dir", IN + "/dup_manifest"],
                                  r"dup_manifest/manifest\.json: key 'kind' appears twice"),
    "duplicate key: an evaluation item": (["evaluate", "--checkpoint", IN + "/garbage.safetensors",
                                           "--hellaswag_file", IN + "/eval_dup.jsonl"],
                                          r"eval_dup\.jsonl:1: key 'label' appears twice"),
    # blank documents and records
    "blank: a whitespace-only file": (["prepare", "text", "--input", IN + "/blank.txt", "--output_dir", OUT],
                                      r"no documents in \S+blank\.txt: .*empty documents: 1"),
    "blank: a NUL-only file": (["prepare", "text", "--input", IN + "/nul.txt", "--output_dir", OUT],
                               r"no documents in \S+nul\.txt: .*empty documents: 1"),
    "blank: whitespace and NUL records": (["prepare", "text", "--input", IN + "/blank_docs.jsonl", "--output_dir",
                                           OUT], r"no documents in \S+blank_docs\.jsonl: .*empty documents: 2"),
    "blank: a Dolly record": (["prepare", "dolly", "--input", IN + "/dolly_blank.jsonl", "--output_dir", OUT],
                              r"dolly_blank\.jsonl:1: field 'instruction' is empty or blank"),
    # evaluation items
    "eval: a list, not an item": (["evaluate", "--checkpoint", IN + "/garbage.safetensors", "--hellaswag_file",
                                   IN + "/eval_list.jsonl"], r"eval_list\.jsonl:2: expected a JSON object"),
    "eval: a boolean label": (["evaluate", "--checkpoint", IN + "/garbage.safetensors", "--hellaswag_file",
                               IN + "/eval_bool_label.jsonl"], r"eval_bool_label\.jsonl:1: field 'label'"),
    "eval: an empty ending": (["evaluate", "--checkpoint", IN + "/garbage.safetensors", "--hellaswag_file",
                               IN + "/eval_empty_ending.jsonl"],
                              r"eval_empty_ending\.jsonl:1: endings\[1\] is empty or blank"),
    "eval: a blank context": (["evaluate", "--checkpoint", IN + "/garbage.safetensors", "--hellaswag_file",
                               IN + "/eval_blank_ctx.jsonl"], r"eval_blank_ctx\.jsonl:1: ctx is empty or blank"),
    "eval: a number as ending": (["evaluate", "--checkpoint", IN + "/garbage.safetensors", "--hellaswag_file",
                                  IN + "/eval_number_ending.jsonl"],
                                 r"eval_number_ending\.jsonl:1: field 'endings' must be a list"),
    "eval: an empty ending, in training": (["pretrain", "--data_dir", "{text_data}", "--hellaswag_interval", "1",
                                            "--hellaswag_file", IN + "/eval_empty_ending.jsonl"],
                                           r"eval_empty_ending\.jsonl:1: endings\[1\] is empty or blank"),
    # DeepSpeed configs: values DeepSpeed would reinterpret silently, NVMe offload without its folder
    "ds types: bf16 enabled as a string": (["pretrain", "--deepspeed_config", IN + "/ds_bf16_string.json"],
                                           r"bf16\.enabled = \"false\" is not a valid boolean"),
    "ds types: fp16 enabled as a number": (["pretrain", "--deepspeed_config", IN + "/ds_fp16_number.json"],
                                           r"fp16\.enabled = 1 is not a valid boolean"),
    "ds types: a boolean as a string": (["pretrain", "--deepspeed_config", IN + "/ds_overlap_string.json"],
                                        r"zero_optimization\.overlap_comm = \"false\" \(a string where DeepSpeed "
                                        r"expects true or false\)"),
    "ds types: a number as a boolean": (["pretrain", "--deepspeed_config", IN + "/ds_bucket_bool.json"],
                                        r"zero_optimization\.reduce_bucket_size = true \(a boolean where DeepSpeed "
                                        r"expects a number\)"),
    "ds types: a top-level number as a string": (["pretrain", "--deepspeed_config", IN + "/ds_steps_string.json"],
                                                 r"steps_per_print = \"10\" \(a string where DeepSpeed expects a "
                                                 r"number\)"),
    "ds types: a nested boolean as a number": (["pretrain", "--optimizer", "adamw", "--deepspeed_config",
                                                IN + "/ds_pin_number.json"],
                                               r"offload_optimizer\.pin_memory = 1 \(a number where DeepSpeed"),
    "ds config: NVMe without a path": (["pretrain", "--optimizer", "adamw", "--deepspeed_config",
                                        IN + "/ds_nvme_no_path.json"],
                                       r"zero_optimization\.offload_param offloads to NVMe but nvme_path is null"),
    "ds config: NVMe folder absent": (["pretrain", "--optimizer", "adamw", "--deepspeed_config",
                                       IN + "/ds_nvme_absent.json"], r"nvme_path /nonexistent/nvme: no such folder"),
    # numbers out of range, not finite; blank paths
    "range: a negative seed": (["pretrain", "--seed", "-1"],
                               r"--seed \(train\.seed\) = -1 is not allowed: an integer from 0 to 4294967295"),
    "range: a seed beyond numpy's": (["pretrain", "--seed", str(2**32)], r"--seed \(train\.seed\) = 4294967296"),
    "range: a sampling seed beyond numpy's": (["generate", "--checkpoint", IN + "/garbage.safetensors", "--prompt",
                                               "Hi", "--seed", str(10**20)], r"--seed \(generate\.seed\) = "),
    "range: a micro batch beyond 64 bits": (["pretrain", "-B", str(10**30)],
                                            r"--micro_batch_size \(data\.micro_batch_size\) = 10{30} is not "
                                            r"allowed: an integer that fits in 64 bits"),
    "range: steps beyond 64 bits": (["pretrain", "--max_steps", str(10**30)], r"--max_steps .* fits in 64 bits"),
    "range: a million tokeniser processes": (["prepare", "text", "--input", IN + "/corpus", "--output_dir", OUT,
                                              "--num_workers", "1000000"],
                                             r"--num_workers .* an integer from 0 to 256"),
    "range: evaluation batches beyond 64 bits": (["evaluate", "--checkpoint", IN + "/garbage.safetensors",
                                                  "--eval_batches", str(2**64)], r"--eval_batches .* fits in 64 bits"),
    "finite: a nan learning rate": (["pretrain", "--lr", "nan"], r"--lr \(train\.lr\) = nan is not allowed: a finite"),
    "finite: an infinite learning rate": (["finetune", "--lr", "inf"], r"--lr \(train\.lr\) = inf is not allowed"),
    "finite: an infinite weight decay": (["pretrain", "--weight_decay", "inf"], r"--weight_decay .* = inf"),
    "finite: an infinite temperature": (["generate", "--checkpoint", IN + "/garbage.safetensors", "--prompt", "Hi",
                                         "--temperature", "inf"], r"--temperature .* = inf is not allowed"),
    "finite: an infinite shard size": (["convert", "zero-to-fp32", IN + "/ckpt", OUT, "--max_shard_mb", "inf"],
                                       r"--max_shard_mb .* = inf is not allowed"),
    "blank: an empty --log_dir": (["pretrain", "--log_dir", ""], r"--log_dir \(train\.log_dir\) = '' is not allowed"),
    "blank: a blank --data_dir": (["pretrain", "--data_dir", "  "], r"--data_dir \(data\.data_dir\) = '  '"),
    "blank: an empty --output_dir": (["prepare", "text", "--input", IN + "/corpus", "--output_dir", ""],
                                     r"--output_dir .* = '' is not allowed"),
    "finite: NaN in a Hugging Face config": (["convert", "hf-to-gptds", IN + "/hf_nan", OUT + ".safetensors"],
                                             r"hf_nan/config\.json: the number NaN is not finite"),
    "finite: Infinity in a DeepSpeed config": (["pretrain", "--deepspeed_config", IN + "/ds_infinite.json"],
                                               r"ds_infinite\.json: the number Infinity is not finite"),
    "config: heads that do not divide the width": (["convert", "hf-to-gptds", IN + "/hf_indivisible",
                                                    OUT + ".safetensors"],
                                                   r"hf_indivisible/config\.json: not a GPT-2 config gptds can build "
                                                   r"\(GPTConfig\.n_embd \(64\) must be divisible"),
    "config: an epsilon as a string": (["finetune", "--pretrained_checkpoint", IN + "/hf_epsilon_string"],
                                       r"hf_epsilon_string/config\.json: not a GPT-2 config .*layer_norm_epsilon"),
    # a batch larger than the split
    "batch: larger than the split": (["pretrain", "--data_dir", "{text_data}", "-B", "100000"],
                                     r"the train split holds \d+ sequences of 33 tokens, fewer than one micro step "
                                     r"takes \(100000 per rank"),
    "batch: an optimizer step larger than the split": (["pretrain", "--data_dir", "{text_data}", "--grad_accum_steps",
                                                        str(2**40)],
                                                       r"fewer than one optimizer step takes \(micro batch 2 x grad "
                                                       r"accumulation 1099511627776 x 1 rank\(s\)"),
    # outputs overlapping inputs, --overwrite or not
    "overlap: prepare into its input": (["prepare", "text", "--input", IN + "/corpus", "--output_dir",
                                         IN + "/corpus", "--overwrite"],
                                        r"--output_dir \S+/corpus is the same path as the input --input"),
    "overlap: prepare inside its input": (["prepare", "text", "--input", IN + "/corpus", "--output_dir",
                                           IN + "/corpus/prepared", "--overwrite"],
                                          r"--output_dir \S+/corpus/prepared lies inside the input --input"),
    "overlap: prepare over a folder holding its input": (["prepare", "text", "--input", IN + "/corpus/a.txt",
                                                          "--output_dir", IN + "/corpus", "--overwrite"],
                                                         r"--output_dir \S+/corpus contains the input --input"),
    "overlap: dolly into its input": (["prepare", "dolly", "--input", IN + "/dolly_dir", "--output_dir",
                                       IN + "/dolly_dir", "--overwrite"], r"is the same path as the input --input"),
    "overlap: convert onto its checkpoints": (["convert", "zero-to-fp32", IN + "/ckpt", IN + "/ckpt", "--overwrite"],
                                              r"OUT \S+/ckpt is the same path as the input CHECKPOINT_DIR"),
    "overlap: convert into its checkpoints": (["convert", "zero-to-hf", IN + "/ckpt", IN + "/ckpt/hf"],
                                              r"OUT_DIR \S+/ckpt/hf lies inside the input CHECKPOINT_DIR"),
    "overlap: universal onto its checkpoints": (["convert", "zero-to-universal", IN + "/ckpt", IN + "/ckpt",
                                                 "--overwrite"], r"OUT_DIR \S+/ckpt is the same path as the input"),
    "overlap: HF weights into the HF folder": (["convert", "hf-to-gptds", IN + "/hf_truncated_weights",
                                                IN + "/hf_truncated_weights/model.safetensors", "--overwrite"],
                                               r"OUT \S+/model\.safetensors lies inside the input HF_DIR"),
    "overlap: checkpoints into the data": (["pretrain", "--data_dir", "{text_data}", "--checkpoint_dir",
                                            "{text_data}"],
                                           r"--checkpoint_dir \S+ is the same path as the input --data_dir"),
    "overlap: a run inside the data": (["pretrain", "--data_dir", "{text_data}", "--log_dir", "{text_data}/run"],
                                       r"--log_dir \S+/run lies inside the input --data_dir"),
    # damaged checkpoints
    "checkpoint: a shard damaged in place": (["convert", "zero-to-fp32", IN + "/ckpt_damaged", OUT],
                                             r"file shard\.pt does not match its xxh3_128 checksum in meta\.json"),
    "checkpoint: a meta.json field renamed": (["convert", "zero-to-hf", IN + "/ckpt_renamed", OUT],
                                              r"meta\.json: field 'model_config' is missing"),
    "checkpoint: resume from a damaged one": (["pretrain", "--data_dir", "{text_data}", "--resume",
                                               "--checkpoint_path", IN + "/ckpt_damaged/step_00000001"],
                                              r"step_00000001: file shard\.pt does not match its xxh3_128 checksum"),
    # reinforcement learning: the prompts file, then its flags
    "rl: prompts not JSON": (["rl", "--task_file", IN + "/not_json.jsonl"], r"not_json\.jsonl:1: invalid JSON"),
    "rl: prompts empty": (["rl", "--task_file", IN + "/empty.jsonl"], r"empty\.jsonl: no arithmetic prompt items"),
    "rl: prompts binary": (["rl", "--task_file", IN + "/binary.txt"], r"binary\.txt: byte \d+: not valid UTF-8"),
    "rl: an answer without its final number": (["rl", "--task_file", IN + "/rl_no_hashes.jsonl"],
                                               r"rl_no_hashes\.jsonl:2: field 'answer' has no '#### N'"),
    "rl: a question that is a list": (["rl", "--task_file", IN + "/rl_list_question.jsonl"],
                                      r"rl_list_question\.jsonl:1: field 'question' missing or not a string"),
    "rl: nested too deep": (["rl", "--task_file", IN + "/rl_deep.jsonl"], r"rl_deep\.jsonl:1: .*nested"),
    "rl: a prompt longer than the context": (["rl", "--task_file", IN + "/rl_long.jsonl"],
                                             r"rl_long\.jsonl:1: the prompt is \d+ tokens; with --max_new_tokens 8"),
    "rl: prompts missing": (["rl", "--task_file", IN + "/nonexistent.jsonl"],
                            r"nonexistent\.jsonl: cannot read arithmetic prompt file"),
    "rl: no completions per prompt": (["rl", "--num_samples", "0"], r"--num_samples \(rl\.num_samples\) = 0"),
    "rl: a temperature that is not a number": (["rl", "--temperature", "nan"],
                                               r"--temperature \(rl\.temperature\) = nan is not allowed"),
    "rl: negative answer length": (["rl", "--max_new_tokens", "-1"],
                                   r"--max_new_tokens \(rl\.max_new_tokens\) = -1"),
    "rl: a batch that splits a group": (["rl", "-B", "12"],
                                        r"--micro_batch_size 12 .* not a multiple of --num_samples"),
}
TRAINING = ("pretrain", "finetune")
RL = ["--pretrained_checkpoint", IN + "/ckpt", "--max_steps", "1", "--eval_task_interval", "0", "--generate_interval",
      "0"]


def leftovers(folder: Path) -> list[str]:
    """Staging folders and temp files that a clean refusal must not leave."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if re.search(r"\.partial|\.tmp|\.staging", p.name))


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_with_one_line_naming_it(case, inputs, text_data, tmp_path, capsys):
    argv, expected = CASES[case]
    out = tmp_path / "out"
    if argv[0] == "rl":  # a checkpoint to improve (its meta.json is all that is read before the prompts)
        argv = ["rl", *RL, "--log_dir", OUT, *argv[1:]]
    argv = [a.replace(IN, str(inputs)).replace(OUT, str(out)).replace("{text_data}", str(text_data)) for a in argv]
    if argv[0] in TRAINING:  # the case's own flags last, so that they win
        argv = [argv[0], *TRAIN, "--log_dir", str(out), *argv[1:]]
    before = sorted(p.name for p in inputs.rglob("*"))
    FIGURES["inputs_tried"] += 1
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    err = capsys.readouterr().err.strip()
    command = argv[0]
    assert status == 2, err
    assert "Traceback" not in err
    *progress, error = err.splitlines()  # progress bars (tqdm, on stderr) may come before the error
    assert error.startswith(f"gptds {command}: error: ") and "error:" not in "".join(progress), err
    assert all(re.search(r"\[\d\d:\d\d", line) for line in progress), err
    assert re.search(expected, error), err
    assert not out.exists() and not list(tmp_path.glob("out*")), sorted(tmp_path.iterdir())
    assert leftovers(inputs) == [] and sorted(p.name for p in inputs.rglob("*")) == before
    FIGURES["inputs_refused_cleanly"] += 1
    FIGURES["inputs"].append({"case": case, "error": error})


def test_a_huge_single_line_is_tokenised_not_refused(tmp_path, capsys):
    """A 4 MB document on one line (no newline at all) is a document, not an error, and not held twice."""
    words = (ASSETS_DIR / "tinyshakespeare.txt").read_text().split()
    line = " ".join(RNG.choice(words) for _ in range(700_000))
    assert len(line) > 3_500_000 and "\n" not in line
    (tmp_path / "huge.jsonl").write_text(json.dumps({"text": line}))  # a huge JSONL line, too
    (tmp_path / "huge.txt").write_text(line)
    FIGURES["inputs_tried"] += 2
    from gptds.tokenizer import get_tokenizer
    expected = len(get_tokenizer().encode_ordinary(line)) + 1  # and <|endoftext|>
    for name in ("huge.txt", "huge.jsonl"):
        out = tmp_path / f"out-{name}"
        assert main(["prepare", "text", "--input", str(tmp_path / name), "--output_dir", str(out),
                     "--num_workers", "0"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["documents"] == 1
        assert sum(s["num_tokens"] for s in manifest["shards"]) == expected
        FIGURES["inputs_accepted_correctly"] += 1
    capsys.readouterr()


def test_blank_documents_among_good_ones_are_skipped_and_counted(tmp_path, capsys):
    """Whitespace-only, NUL-only and control-character documents add no tokens (each would be an end token
    or thousands of tokens of nothing); the good document around them is kept exactly."""
    records = ["To be, or not to be.", " \n\t ", "\0\0\0", "\x0b\x0c\u200b", "that is the question."]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    FIGURES["inputs_tried"] += 1
    out = tmp_path / "out"
    assert main(["prepare", "text", "--input", str(tmp_path / "mixed.jsonl"), "--output_dir", str(out),
                 "--num_workers", "0", "--val_block_tokens", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    from gptds.tokenizer import encode
    assert (manifest["documents"], manifest["empty_documents"]) == (2, 3)
    assert sum(s["num_tokens"] for s in manifest["shards"]) == len(encode(records[0])) + len(encode(records[-1])) + 2
    assert "skipped 3 documents with empty or blank text" in capsys.readouterr().out
    FIGURES["inputs_accepted_correctly"] += 1
