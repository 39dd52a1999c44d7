"""Row files as users bring them: JSONL with a byte-order mark, a .json array, CSV; and the errors
for files that are none of those name the file and line; transcripts kept as one text split into
messages."""

import json

import pytest

from posttrain.data import DataError, iter_rows, read_rows, split_transcript

ROWS = [{"prompt": "What is 2 + 2?", "completion": "4"}, {"prompt": "Say hi, politely.", "completion": "Hello!"}]


def test_jsonl_with_a_byte_order_mark_reads_its_first_row(tmp_path):
    path = tmp_path / "exported.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in ROWS).encode())
    assert read_rows(path) == ROWS
    assert [where for where, _ in iter_rows(path)] == [f"{path}:1", f"{path}:2"]


def test_a_json_file_holding_one_array_reads_as_rows(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("\ufeff  \n" + json.dumps(ROWS, indent=2), encoding="utf-8")
    assert read_rows(path) == ROWS
    assert [where for where, _ in iter_rows(path)][1] == f"{path}[row 1]"


def test_a_json_file_with_an_object_per_line_still_reads_as_jsonl(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert read_rows(path) == ROWS


def test_csv_cells_stay_text_and_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text('\ufeffprompt,chosen,rejected\n"Add 2, then 3",5,\n\n"Say hi,\non two lines",Hello!,NA\n'
                    'Say bye,Bye!,go away\n', encoding="utf-8")
    rows = list(iter_rows(path))
    assert [where for where, _ in rows] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    # An answer of digits stays the text "5", an empty cell the empty text, "NA" the letters.
    assert rows[0][1] == {"prompt": "Add 2, then 3", "chosen": "5", "rejected": ""}
    assert rows[1][1] == {"prompt": "Say hi,\non two lines", "chosen": "Hello!", "rejected": "NA"}


@pytest.mark.parametrize("name,text,expected", [
    ("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', ":2: not a valid JSON object"),
    ("array.jsonl", json.dumps(ROWS) + "\n", ":1: expected a JSON object per line, got list (a .jsonl file holds one "
                                             "object per line; a JSON array belongs in a .json file)"),
    ("numbers.json", "[1, 2]", "[row 0]: expected a JSON object per array element, got int"),
    ("cut.json", '[{"prompt": "a"},', ": not valid JSON"),
    ("short.csv", "prompt,completion\nhi,hello\nbye\n", ":3: 1 fields, but the header line has 2 (prompt, completion)"),
    ("rows.txt", "prompt\n", "unsupported data file; expected .jsonl, .json (either may be gzipped), .csv"),
])
def test_files_that_are_not_rows_are_refused_with_file_and_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert str(e.value).startswith(str(path)) and expected in str(e.value)


def test_a_blank_rl_prompt_is_refused_with_its_line(toy_tokenizer, tmp_path):
    from posttrain.data import load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}) + "\n"
                    + json.dumps({"prompt": " ", "answer": "6"}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: prompt: empty"):
        load_prompts(str(path), toy_tokenizer, 64)


def test_gzipped_jsonl_and_json_arrays_read_as_the_files_inside(tmp_path):
    import gzip

    lines = tmp_path / "data.jsonl.gz"
    lines.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    array = tmp_path / "data.json.gz"
    array.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert read_rows(lines) == ROWS == read_rows(array)
    assert [where for where, _ in iter_rows(lines)] == [f"{lines}:1", f"{lines}:2"]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(json.dumps(ROWS[0]).encode() * 50)[:40])
    with pytest.raises(DataError, match=rf"{cut.name}: cannot read the compressed file"):
        read_rows(cut)
    other = tmp_path / "data.csv.gz"
    other.write_bytes(gzip.compress(b"prompt\nhi\n"))
    with pytest.raises(DataError, match="a compressed file must be .jsonl.gz or .json.gz"):
        read_rows(other)


def test_saved_dataset_directories_read_in_place_and_other_directories_are_explained(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert read_rows(single) == ROWS
    one_split = tmp_path / "one_split"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(one_split))
    assert read_rows(one_split) == ROWS  # not the split names
    two = tmp_path / "two_splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(two))
    with pytest.raises(DataError, match="a saved dataset with splits train, test; name one"):
        read_rows(two)
    plain = tmp_path / "clone"
    (plain / "data").mkdir(parents=True)
    (plain / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        read_rows(plain)


HH_TURNS = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}


def test_a_transcript_splits_into_turns_at_its_markers():
    text = ("\n\nHuman: What are some words for rude?\n\nAssistant: Here is a list.\n\nAss, boor, churl\n\n"
            "Human: Is Human: a word?\n\nAssistant: Yes.")
    assert split_transcript(text, HH_TURNS, "k") == [
        {"role": "user", "content": "What are some words for rude?"},
        # "Ass, ..." after a blank line is not a marker; "Human:" inside a line is text.
        {"role": "assistant", "content": "Here is a list.\n\nAss, boor, churl"},
        {"role": "user", "content": "Is Human: a word?"},
        {"role": "assistant", "content": "Yes."},
    ]
    # An empty last answer stays an (empty) turn: the pair check refuses it with the row, nothing is dropped here.
    assert split_transcript("\n\nHuman: hi\n\nAssistant:", HH_TURNS, "k")[-1] == {"role": "assistant", "content": ""}
    # Markers inside a line, as timdettmers/openassistant-guanaco writes them; the longer marker wins.
    guanaco = {"### Human:": "user", "### Assistant:": "assistant", "### Assistant (edited):": "assistant"}
    assert split_transcript("### Human: Hi.### Assistant (edited): Hello!### Human: Bye.", guanaco, "k") == [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye."}]


@pytest.mark.parametrize("value, expected", [
    ("Summarise this.\n\nHuman: hi\n\nAssistant: yo", r"k: text before the first marker '\\n\\nHuman:': 'Summarise this."),
    ("User: hi\nBot: yo", r"k: none of the markers \['\\n\\nHuman:', '\\n\\nAssistant:'\] occurs in 'User: hi"),
    (["Human: hi"], r"k: expected the transcript as text, got list"),
])
def test_a_transcript_that_does_not_split_is_refused(value, expected):
    with pytest.raises(DataError, match=expected):
        split_transcript(value, HH_TURNS, "k")


def test_load_table_reads_gzipped_json_and_refuses_data_dir_on_a_file(tmp_path):
    import gzip

    from posttrain.data import load_table

    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert list(load_table(str(path), hub=False)) == ROWS
    with pytest.raises(DataError, match=r"prefs\.data_dir: applies to a repository's folder .* is a file"):
        load_table(str(path), hub=False, data_dir="helpful-base", where="prefs")
    (tmp_path / "rows.txt.gz").write_bytes(path.read_bytes())
    with pytest.raises(DataError, match=r"rows\.txt\.gz: unsupported file; expected .jsonl, .json \(either may be gzipped\)"):
        load_table(str(tmp_path / "rows.txt.gz"), hub=False)


def test_a_mapped_csv_keeps_every_cell_as_text_as_the_unmapped_one_does(tmp_path):
    from posttrain.data import load_table

    path = tmp_path / "zip.csv"
    path.write_bytes(b'\xef\xbb\xbfquestion,answer,note\n"What is 2+2?",4,\n"Zip, code?",02139,x\n')
    expected = [{"question": "What is 2+2?", "answer": "4", "note": ""},
                {"question": "Zip, code?", "answer": "02139", "note": "x"}]
    assert [row for _, row in iter_rows(path)] == expected
    assert list(load_table(str(path), hub=False)) == expected
