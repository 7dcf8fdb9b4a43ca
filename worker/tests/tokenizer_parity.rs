//! The Rust CLIP tokenizer against the real open_clip.
//!
//! `fixtures/reference/tokenizer_cases.json` was written by
//! `tools/reference/make_fixtures.py` with open_clip 3.3.0 (`open_clip.tokenize`,
//! the tokenizer's `clean_fn`, its regex and `bpe`): every case must give exactly
//! the same cleaned text, BPE pieces and 77 ids. `EXTRA_CASES` below are further
//! ftfy paths (mojibake variants, entity rules, control characters), with the
//! expected values produced by the same open_clip 3.3.0 / ftfy 6.3.1 in
//! `tools/reference/.venv` when the tokenizer was written.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Deserialize;
use worker::model::tokenizer::{
    Tokenizer, TokenizerError, DEFAULT_CONTEXT_LENGTH, EOT, SOT, VOCAB_SIZE,
};

#[derive(Deserialize)]
struct Fixture {
    context_length: usize,
    sot: u32,
    eot: u32,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    cleaned: String,
    pieces: Vec<String>,
    truncated: bool,
    ids: Vec<i64>,
}

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn fixture() -> Fixture {
    let path = repo_path("fixtures/reference/tokenizer_cases.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Compares one field, noting a mismatch in `report`.
fn check<T: PartialEq + std::fmt::Debug>(
    report: &mut String,
    what: &str,
    expected: &T,
    got: &T,
) -> bool {
    if expected == got {
        return true;
    }
    let _ = writeln!(
        report,
        "    {what}: expected {expected:?}\n    {what}:      got {got:?}"
    );
    false
}

#[test]
fn fixture_cases_match_open_clip_exactly() {
    worker::runtime::init();
    let fx = fixture();
    assert_eq!(
        (fx.sot, fx.eot, fx.context_length),
        (SOT, EOT, DEFAULT_CONTEXT_LENGTH)
    );
    let tok = Tokenizer::clip();
    let mut report = String::new();
    let mut failed = 0;
    for (n, case) in fx.cases.iter().enumerate() {
        let cleaned = worker::model::tokenizer::clean(&case.text);
        let raw = tok.encode_cleaned(&cleaned);
        let pieces: Vec<String> = raw
            .iter()
            .map(|&id| tok.token(id).unwrap_or("<?>").to_owned())
            .collect();
        let ids = tok.tokenize(&case.text, fx.context_length);
        let mut detail = String::new();
        let ok = check(&mut detail, "cleaned", &case.cleaned, &cleaned)
            & check(&mut detail, "pieces", &case.pieces, &pieces)
            & check(
                &mut detail,
                "truncated",
                &case.truncated,
                &(raw.len() + 2 > fx.context_length),
            )
            & check(&mut detail, "ids", &case.ids, &ids);
        if !ok {
            failed += 1;
            let _ = writeln!(report, "case {n} {:?}:\n{detail}", case.text);
        }
    }
    let total = fx.cases.len();
    assert!(total >= 30, "expected the 30 fixture cases, found {total}");
    assert!(
        failed == 0,
        "{failed} of {total} fixture cases differ from open_clip:\n{report}"
    );
    eprintln!("tokenizer parity: {total} of {total} fixture cases match open_clip exactly");
}

#[test]
fn a_photo_of_a_cat() {
    worker::runtime::init();
    let ids = Tokenizer::clip().tokenize("a photo of a cat", 77);
    let mut expected = vec![49406, 320, 1125, 539, 320, 2368, 49407];
    expected.resize(77, 0);
    assert_eq!(ids, expected);
    assert_eq!(
        Tokenizer::clip().encode("a photo of a cat"),
        [320, 1125, 539, 320, 2368]
    );
}

#[test]
fn truncation_keeps_eot_last() {
    worker::runtime::init();
    let tok = Tokenizer::clip();
    let long = "a photo of a cat ".repeat(40);
    let ids = tok.tokenize(&long, 77);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], i64::from(SOT));
    assert_eq!(ids[76], i64::from(EOT));
    assert!(ids.iter().all(|&id| id != 0));
    // Shorter contexts behave like open_clip's slicing, down to one id.
    assert_eq!(
        tok.tokenize("a photo of a cat", 4),
        [49406, 320, 1125, 49407]
    );
    assert_eq!(tok.tokenize("a photo of a cat", 1), [49407]);
    assert_eq!(tok.tokenize("", 3), [49406, 49407, 0]);
}

#[test]
fn batch_is_row_major_rows_of_tokenize() {
    worker::runtime::init();
    let fx = fixture();
    let tok = Tokenizer::clip();
    let texts: Vec<&str> = fx.cases.iter().map(|c| c.text.as_str()).collect();
    let batch = tok.tokenize_batch(&texts, 77);
    assert_eq!(batch.len(), texts.len() * 77);
    for (row, case) in batch.chunks(77).zip(&fx.cases) {
        assert_eq!(row, case.ids.as_slice(), "{:?}", case.text);
    }
    assert!(tok.tokenize_batch(&[], 77).is_empty());
}

#[test]
fn vocabulary_file_and_embedded_copy_agree() {
    worker::runtime::init();
    let path = repo_path("fixtures/vocab/bpe_simple_vocab_16e6.txt.gz");
    let from_file = Tokenizer::from_gz_file(&path).expect("fixture vocabulary loads");
    let from_bytes =
        Tokenizer::from_gz_bytes(&std::fs::read(&path).expect("read vocabulary")).expect("loads");
    let embedded = Tokenizer::clip();
    assert_eq!(embedded.vocab_size(), VOCAB_SIZE);
    assert_eq!(from_file.vocab_size(), VOCAB_SIZE);
    assert_eq!(embedded.token(SOT), Some("<start_of_text>"));
    assert_eq!(embedded.token(EOT), Some("<end_of_text>"));
    assert_eq!(embedded.token(320), Some("a</w>"));
    for case in fixture().cases {
        let expected = embedded.tokenize(&case.text, 77);
        assert_eq!(
            from_file.tokenize(&case.text, 77),
            expected,
            "{:?}",
            case.text
        );
        assert_eq!(
            from_bytes.tokenize(&case.text, 77),
            expected,
            "{:?}",
            case.text
        );
    }
    assert_eq!(
        embedded.decode(&embedded.encode("A photo of a Cat!")),
        "a photo of a cat ! "
    );
}

#[test]
fn bad_vocabulary_files_name_the_path() {
    worker::runtime::init();
    let missing = repo_path("fixtures/vocab/no-such-vocab.txt.gz");
    let err = Tokenizer::from_gz_file(&missing).unwrap_err();
    assert!(matches!(err, TokenizerError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-vocab.txt.gz"), "{err}");

    let dir = tempfile::tempdir().expect("temp dir");
    let not_gzip = dir.path().join("plain.txt.gz");
    std::fs::write(&not_gzip, "i n\nt h\n").expect("write");
    let err = Tokenizer::from_gz_file(&not_gzip).unwrap_err();
    assert!(matches!(err, TokenizerError::BadVocab { .. }), "{err:?}");
    assert!(err.to_string().contains("plain.txt.gz"), "{err}");

    let mut gz = gzip("#version: 0.2\ni n\nt h\n");
    let err = Tokenizer::from_gz_bytes(&gz).unwrap_err();
    assert!(err.to_string().contains("need 48894 merges"), "{err}");
    gz.truncate(gz.len() / 2);
    assert!(Tokenizer::from_gz_bytes(&gz).is_err());
}

fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(text.as_bytes()).expect("gzip in memory");
    enc.finish().expect("gzip in memory")
}

/// A case beyond the fixture file; expected values from open_clip 3.3.0.
struct Extra {
    why: &'static str,
    text: &'static str,
    cleaned: &'static str,
    /// `encode(text)`: the ids without SOT/EOT.
    ids: &'static [u32],
}

const EXTRA_CASES: &[Extra] = &[
    Extra {
        why: "mojibake embedded in good UTF-8 (decode_inconsistent_utf8)",
        text: "naïve cafÃ© with crème brûlée",
        cleaned: "naïve café with crème brûlée",
        ids: &[
            1097, 35689, 563, 15304, 593, 1075, 12138, 614, 711, 127, 119, 75, 13489,
        ],
    },
    Extra {
        why: "windows-1251 mojibake",
        text: "РїСЂРёРІРµС‚ РјРёСЂ",
        cleaned: "привет мир",
        ids: &[
            26302, 16370, 29503, 110, 22176, 141, 480, 38018, 16701, 141, 478,
        ],
    },
    Extra {
        why: "triple mojibake",
        text: "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
        cleaned: "the mona lisa doesn't have eyebrows.",
        ids: &[518, 19143, 7424, 2503, 713, 720, 19923, 269],
    },
    Extra {
        why: "restore_byte_a0: `Ã ` was `à `",
        text: "voilÃ le travail",
        cleaned: "voilà le travail",
        ids: &[947, 543, 21259, 579, 752, 21189],
    },
    Extra {
        why: "ftfy entities: upper-case names, nesting, numeric; html.unescape prefix rule",
        text: "P&EACUTE;REZ &amp;amp;amp; &notit; &#x1F431;",
        cleaned: "pérez & ¬it; 🐱",
        ids: &[43167, 15192, 261, 126, 361, 585, 282, 22979],
    },
    Extra {
        why: "a literal `<` switches ftfy's unescaping off",
        text: "<b>bold</b> &amp;amp;amp;",
        cleaned: "<b>bold</b> &amp;",
        ids: &[283, 321, 285, 8911, 34308, 321, 285, 261, 6259, 282],
    },
    Extra {
        why: "C1 controls read as windows-1252",
        text: "a photo of a\u{85}cat \u{93}quoted\u{94}",
        cleaned: "a photo of a…cat \"quoted\"",
        ids: &[320, 1125, 539, 320, 959, 2368, 257, 27706, 257],
    },
    Extra {
        why: "terminal escapes and control characters removed",
        text: "\u{1b}[1;31mred\u{1b}[0m photo\u{7}",
        cleaned: "red photo",
        ids: &[736, 1125],
    },
    Extra {
        why: "half-width katakana and full-width Latin",
        text: "ｶﾀｶﾅ and ＦＵＬＬ\u{3000}ＷＩＤＴＨ",
        cleaned: "カタカナ and full width",
        ids: &[37367, 34941, 37367, 2429, 488, 537, 1476, 23571],
    },
    Extra {
        why: "final sigma when lowercasing",
        text: "ΟΔΟΣ ΚΑΙ ΣΠΙΤΙ",
        cleaned: "οδος και σπιτι",
        ids: &[
            138, 123, 138, 112, 138, 123, 139, 480, 138, 118, 138, 109, 138, 373, 139, 225, 139,
            222, 138, 117, 139, 226, 138, 373,
        ],
    },
    Extra {
        why: "line separators and CRLF",
        text: "line one\u{2028}line two\u{d}\u{a}line three",
        cleaned: "line one line two line three",
        ids: &[1148, 637, 1148, 1237, 1148, 2097],
    },
    Extra {
        why: "Latin ligatures and digraphs",
        text: "ﬂuﬃest ﬆrange Ĳssel",
        cleaned: "fluffiest strange ijssel",
        ids: &[3698, 19961, 1509, 7288, 7337, 19373],
    },
    Extra {
        why: "contractions",
        text: "it's a dog's life, isn't it",
        cleaned: "it's a dog's life, isn't it",
        ids: &[585, 568, 320, 1929, 568, 970, 267, 2923, 713, 585],
    },
    Extra {
        why: "U+0345 matches no pre-tokenisation alternative",
        text: "a photo of a ᾳ and a\u{345}b",
        cleaned: "a photo of a ᾳ and a\u{345}b",
        ids: &[320, 1125, 539, 320, 157, 122, 367, 537, 320, 321],
    },
];

#[test]
fn extra_ftfy_cases_match_open_clip() {
    worker::runtime::init();
    let tok = Tokenizer::clip();
    let mut report = String::new();
    let mut failed = 0;
    for case in EXTRA_CASES {
        let mut detail = String::new();
        let ok = check(
            &mut detail,
            "cleaned",
            &case.cleaned.to_owned(),
            &worker::model::tokenizer::clean(case.text),
        ) & check(
            &mut detail,
            "ids",
            &case.ids.to_vec(),
            &tok.encode(case.text),
        );
        if !ok {
            failed += 1;
            let _ = writeln!(report, "{} {:?}:\n{detail}", case.why, case.text);
        }
    }
    assert!(
        failed == 0,
        "{failed} of {} extra cases differ from open_clip:\n{report}",
        EXTRA_CASES.len()
    );
}
