//! Loading tests: golden examples for each input format and a located error for each bad input.

use std::path::Path;

use nopad_data::{load_examples, Example, Format, LoadOptions, LongPolicy};

use crate::util::{temp_dir, write};

fn load(path: &Path, opts: &LoadOptions) -> Vec<Example> {
    load_examples(path, opts)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

fn load_err(path: &Path, opts: &LoadOptions) -> String {
    match load_examples(path, opts) {
        Ok(_) => panic!("{}: expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn pretokenized_golden() {
    let dir = temp_dir("pretok");
    let p = write(
        &dir,
        "d.jsonl",
        "{\"input_ids\": [5, 6, 7], \"labels\": [-100, 6, 7]}\n\n{\"input_ids\": [8, 9]}\n",
    );
    let (ex, report) = load_examples(&p, &LoadOptions::new(16)).unwrap();
    assert_eq!(ex[0].labels, [-100, 6, 7]);
    assert_eq!(ex[1].labels, [8, 9], "labels default to input_ids");
    assert_eq!((report.records, report.examples, report.skipped), (2, 2, 0));
    assert_eq!(
        report.to_string(),
        "2 records -> 2 examples (0 skipped, 0 truncated, 0 split, 0 dropped)"
    );
    // The same records as a .json array.
    let p = write(
        &dir,
        "d.json",
        "[\n {\"input_ids\": [5, 6, 7], \"labels\": [-100, 6, 7]},\n {\"input_ids\": [8, 9]}\n]",
    );
    assert_eq!(load(&p, &LoadOptions::new(16)), ex);
}

#[test]
fn long_examples_follow_the_policy_and_are_counted() {
    let dir = temp_dir("long");
    let p = write(&dir, "d.jsonl", "{\"input_ids\": [1,2,3,4,5,6,7]}\n{\"input_ids\": [1,2]}\n{\"input_ids\": [1,2,3,4,5], \"labels\": [-100,-100,-100,-100,5]}\n");
    let run = |long| {
        let mut o = LoadOptions::new(3);
        o.long = long;
        load_examples(&p, &o).unwrap()
    };
    let (ex, r) = run(LongPolicy::Truncate);
    assert_eq!(ex.iter().map(|e| e.len()).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(
        (r.truncated, r.dropped),
        (2, 1),
        "third loses every target: dropped, said so"
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("line 3")),
        "{:?}",
        r.warnings
    );
    let (ex, r) = run(LongPolicy::Split);
    // [7] alone and [1,2,3] of the third record have no target left: dropped, and counted.
    assert_eq!(ex.iter().map(|e| e.len()).collect::<Vec<_>>(), [3, 3, 2, 2]);
    assert_eq!((r.split, r.dropped, r.examples), (2, 2, 4));
    let (ex, r) = run(LongPolicy::Drop);
    assert_eq!(ex.len(), 1);
    assert_eq!(r.dropped, 2);
    assert_eq!("split".parse::<LongPolicy>(), Ok(LongPolicy::Split));
    assert!("cut".parse::<LongPolicy>().is_err());
    assert_eq!(
        "prompt_completion".parse::<Format>(),
        Ok(Format::PromptCompletion)
    );
}

#[test]
fn bad_pretokenized_input_names_line_and_field() {
    let dir = temp_dir("bad");
    let good = "{\"input_ids\": [1, 2, 3]}\n";
    let mut o = LoadOptions::new(16);
    o.vocab_size = Some(100);
    let cases = [
        ("{\"input_ids\": [1, 2,", "d.jsonl:2: malformed JSON"),
        ("[1, 2]", "d.jsonl:2: expected a JSON object, found an array"),
        ("{\"labels\": [1]}", "d.jsonl:2: field `input_ids`: missing"),
        ("{\"input_ids\": \"1 2\"}", "d.jsonl:2: field `input_ids`: expected an array of integers, found a string"),
        ("{\"input_ids\": [1, 2], \"labels\": \"x\"}", "d.jsonl:2: field `labels`: expected an array of integers, found a string"),
        ("{\"input_ids\": [1, 2.5]}", "d.jsonl:2: field `input_ids`: expected an array of integers, found a number at index 1"),
        ("{\"input_ids\": [1, 2], \"labels\": [1]}", "d.jsonl:2: field `labels`: has 1 entries"),
        ("{\"input_ids\": []}", "d.jsonl:2: empty example"),
        ("{\"input_ids\": [1, 100]}", "d.jsonl:2: field `input_ids`: token id 100 at index 1 is not below the vocabulary size 100"),
        ("{\"input_ids\": [1, -3]}", "d.jsonl:2: field `input_ids`: token id -3 at index 1 is negative"),
        ("{\"input_ids\": [1, 2], \"labels\": [1, 200]}", "d.jsonl:2: field `labels`: token id 200"),
    ];
    for (bad, want) in cases {
        let p = write(&dir, "d.jsonl", &format!("{good}{bad}\n{good}"));
        let msg = load_err(&p, &o);
        assert!(
            msg.contains(want),
            "input {bad}\n  got:  {msg}\n  want: {want}"
        );
        let mut skip = o.clone();
        skip.skip_bad = true;
        let (ex, r) = load_examples(&p, &skip).unwrap();
        assert_eq!((ex.len(), r.skipped, r.records), (2, 1, 3), "{bad}");
        assert!(r.warnings[0].contains(want), "{:?}", r.warnings);
    }
    let p = write(
        &dir,
        "a.json",
        "[\n  {\"input_ids\": [1, 2]},\n\n  {\"input_ids\": \"x\"}\n]",
    );
    assert!(load_err(&p, &o).contains("a.json:4: array element 1: field `input_ids`"));
    let p = write(
        &dir,
        "b.json",
        "[\n  {\"input_ids\": [1, 2]},\n  {\"input_ids\": [1,}\n]",
    );
    assert!(load_err(&p, &o).contains("b.json:3: malformed JSON"));
    assert!(load_err(&dir.join("missing.jsonl"), &o).contains("missing.jsonl: cannot read"));
    let p = write(&dir, "u.jsonl", "{\"tokens\": [1, 2]}\n");
    assert!(load_err(&p, &o).contains("u.jsonl:1: cannot tell the record format"));
    let p = write(&dir, "empty.jsonl", "\n");
    assert!(load_err(&p, &o).contains("no records"));
}

#[test]
fn large_files_keep_file_order_and_report_the_first_bad_line() {
    let dir = temp_dir("large");
    let mut text = String::new();
    for i in 0..3000 {
        if i == 776 || i == 2500 {
            text.push_str("{\"input_ids\": [1, \"x\"]}\n");
        } else {
            text.push_str(&format!("{{\"input_ids\": [{i}, {}]}}\n", i + 1));
        }
    }
    let p = write(&dir, "big.jsonl", &text);
    let mut o = LoadOptions::new(8);
    assert!(load_err(&p, &o).contains("big.jsonl:777: field `input_ids`"));
    o.skip_bad = true;
    let (ex, r) = load_examples(&p, &o).unwrap();
    assert_eq!((r.records, r.skipped, ex.len()), (3000, 2, 2998));
    let firsts: Vec<i32> = ex.iter().map(|e| e.input_ids[0]).collect();
    let want: Vec<i32> = (0..3000).filter(|&i| i != 776 && i != 2500).collect();
    assert_eq!(firsts, want);
}
