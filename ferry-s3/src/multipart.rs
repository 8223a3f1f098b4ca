//! S3 multipart uploads, the pure part: how a file is cut into parts, the XML S3 answers
//! and expects, and the ETags that prove what arrived.
//!
//! The flow (S3 API reference: CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
//! AbortMultipartUpload): `POST key?uploads` returns an `UploadId`; each part is
//! `PUT key?partNumber=N&uploadId=…` and answers with the part's `ETag`; `POST key?uploadId=…`
//! with the list of part numbers and ETags makes the object appear at once (readers never
//! see a partial NAR); `DELETE key?uploadId=…` drops the parts of an abandoned upload.
//!
//! Limits (S3 user guide, "Amazon S3 multipart upload limits"; Garage and MinIO enforce the
//! same minimum): parts are numbered 1 to 10,000, every part but the last is at least
//! 5 MiB, none is over 5 GiB.
//!
//! ETags: without SSE-KMS/SSE-C (which Ferry does not ask for) a part's ETag is the hex MD5
//! of its bytes, and the completed object's is the hex MD5 of the parts' binary MD5s
//! followed by `-N` (N parts). Garage 2.x computes it the same way
//! (`garage_api_s3/multipart.rs`, `handle_complete_multipart_upload`). Checking both, plus
//! `Content-MD5` and the signed SHA-256 on each part, means a corrupted or mixed-up part
//! cannot be assembled into a NAR.

use md5::{Digest, Md5};
use thiserror::Error;

/// Smallest part S3 accepts (except the last one).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Most parts one upload may have.
pub const MAX_PARTS: u64 = 10_000;
/// Largest object a single `PUT` may create: above this, multipart is the only way.
pub const MAX_SINGLE_PUT: u64 = 5 * 1024 * 1024 * 1024;

/// One part of a plan: 1-based number, byte range in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{size} bytes do not fit in {MAX_PARTS} parts of at most 5 GiB")]
    TooLarge { size: u64 },
}

/// The parts of a `size`-byte file with parts of `part_size` bytes (clamped to S3's limits,
/// and grown when `size` would need more than 10,000 parts). A 0-byte file is one empty part.
pub fn plan(size: u64, part_size: u64) -> Result<Vec<Part>, PlanError> {
    let mut part_size = part_size.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
    let min_for_count = size.div_ceil(MAX_PARTS);
    if min_for_count > part_size {
        // Round up to a MiB so that the plan stays readable in logs.
        part_size = min_for_count.div_ceil(1 << 20) << 20;
    }
    if part_size > MAX_PART_SIZE {
        return Err(PlanError::TooLarge { size });
    }
    let count = size.div_ceil(part_size).max(1);
    Ok((0..count)
        .map(|i| {
            let offset = i * part_size;
            Part {
                // `count` ≤ 10,000, so this fits.
                number: u32::try_from(i + 1).unwrap_or(u32::MAX),
                offset,
                len: (size - offset).min(part_size),
            }
        })
        .collect())
}

/// Hex MD5 (a part's expected ETag).
pub fn md5_hex(data: &[u8]) -> String {
    hex(&Md5::digest(data))
}

/// Incremental MD5 for parts read in chunks.
#[derive(Default, Clone)]
pub struct Md5Sink(Md5);

impl Md5Sink {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest's 16 bytes.
    pub fn finish(self) -> [u8; 16] {
        self.0.finalize().into()
    }
}

/// `Content-MD5` header value: base64 of the 16 digest bytes.
pub fn content_md5(digest: &[u8; 16]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// Hex of bytes, lower case.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An ETag header or element without its quotes (S3 sends `"…"`, sometimes `&quot;…&quot;`
/// inside XML).
pub fn unquote_etag(etag: &str) -> &str {
    let e = etag.trim();
    let e = e.strip_prefix("&quot;").unwrap_or(e);
    let e = e.strip_suffix("&quot;").unwrap_or(e);
    e.trim_matches('"')
}

/// The ETag S3 gives an object completed from parts with these hex MD5s.
pub fn multipart_etag(part_md5s: &[String]) -> Option<String> {
    let mut outer = Md5::new();
    for p in part_md5s {
        outer.update(unhex(p)?);
    }
    Some(format!("{}-{}", hex(&outer.finalize()), part_md5s.len()))
}

/// The text of the first `<tag>…</tag>` in an S3 XML answer (entities for quotes decoded).
pub fn xml_text(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&close)?;
    let text = body[start..start + len].trim();
    Some(
        text.replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnswerError {
    /// S3 may answer CompleteMultipartUpload with 200 and an `<Error>` body (it sends the
    /// status before it has finished assembling).
    #[error("S3 error {code} in a 200 answer")]
    Embedded { code: String },
    #[error("S3's answer has no <{0}>")]
    Missing(&'static str),
    #[error("upload ID {0:?} is not plausible")]
    BadUploadId(String),
}

/// The `UploadId` of a CreateMultipartUpload answer. Bounded and printable, since it is
/// stored in the queue and sent back in URLs.
pub fn parse_initiate(body: &str) -> Result<String, AnswerError> {
    if let Some(code) = embedded_error(body) {
        return Err(AnswerError::Embedded { code });
    }
    let id = xml_text(body, "UploadId").ok_or(AnswerError::Missing("UploadId"))?;
    if id.is_empty() || id.len() > 1024 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AnswerError::BadUploadId(id.chars().take(64).collect()));
    }
    Ok(id)
}

/// The object ETag of a CompleteMultipartUpload answer, unquoted.
pub fn parse_complete(body: &str) -> Result<String, AnswerError> {
    if let Some(code) = embedded_error(body) {
        return Err(AnswerError::Embedded { code });
    }
    let etag = xml_text(body, "ETag").ok_or(AnswerError::Missing("ETag"))?;
    Ok(unquote_etag(&etag).to_owned())
}

fn embedded_error(body: &str) -> Option<String> {
    body.contains("<Error>")
        .then(|| crate::error_code(body).unwrap_or_else(|| "unknown".into()))
}

/// The CompleteMultipartUpload body: every part, in order, with its ETag.
pub fn complete_body(parts: &[(u32, String)]) -> String {
    let mut s = String::from("<CompleteMultipartUpload>");
    for (n, etag) in parts {
        s.push_str(&format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>\"{}\"</ETag></Part>",
            unquote_etag(etag)
        ));
    }
    s.push_str("</CompleteMultipartUpload>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn plans_cover_the_file_within_limits() {
        let p = plan(100 * MIB + 1, 16 * MIB).expect("plan");
        assert_eq!(p.len(), 7);
        assert_eq!(
            p[0],
            Part {
                number: 1,
                offset: 0,
                len: 16 * MIB
            }
        );
        assert_eq!(
            p[6],
            Part {
                number: 7,
                offset: 96 * MIB,
                len: 4 * MIB + 1
            }
        );
        // Too-small part sizes are raised to S3's minimum.
        assert_eq!(plan(12 * MIB, 1).expect("plan").len(), 3);
        assert_eq!(
            plan(0, 16 * MIB).expect("plan"),
            vec![Part {
                number: 1,
                offset: 0,
                len: 0
            }]
        );
        // 1 TiB at 8 MiB would be 131,072 parts: the part size grows to fit 10,000.
        let big = plan(1 << 40, 8 * MIB).expect("plan");
        assert!(big.len() as u64 <= MAX_PARTS);
        assert!(big.iter().all(|p| p.len <= MAX_PART_SIZE));
        assert_eq!(big.iter().map(|p| p.len).sum::<u64>(), 1 << 40);
        assert!(plan(MAX_PARTS * MAX_PART_SIZE + 1, MIB).is_err());
        for (size, ps) in [
            (1u64, MIB),
            (5 * MIB, 5 * MIB),
            (5 * MIB + 1, 5 * MIB),
            (77 * MIB + 3, 9 * MIB),
        ] {
            let p = plan(size, ps).expect("plan");
            let mut next = 0;
            for (i, part) in p.iter().enumerate() {
                assert_eq!(part.number as usize, i + 1);
                assert_eq!(part.offset, next);
                next += part.len;
                if i + 1 < p.len() {
                    assert!(part.len >= MIN_PART_SIZE);
                }
            }
            assert_eq!(next, size);
        }
    }

    #[test]
    fn etags() {
        // MD5("") and the AWS-style composite of two parts, as `aws s3api` reports them:
        // hex(md5(md5("a") ‖ md5("b")))-2, cross-checked with Python's hashlib.
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        let parts = vec![md5_hex(b"a"), md5_hex(b"b")];
        assert_eq!(
            multipart_etag(&parts).as_deref(),
            Some("96e024ba2074fe77e8e965ba43a704be-2")
        );
        assert_eq!(multipart_etag(&["zz".into()]), None);
        assert_eq!(unquote_etag("\"abc\""), "abc");
        assert_eq!(unquote_etag("&quot;abc&quot;"), "abc");
        let mut s = Md5Sink::new();
        s.update(b"a");
        assert_eq!(hex(&s.finish()), md5_hex(b"a"));
    }

    #[test]
    fn answers() {
        let init = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<InitiateMultipartUploadResult \
                    xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>b</Bucket>\
                    <Key>nar/x.nar.zst</Key><UploadId>VXBsb2FkIElE</UploadId>\
                    </InitiateMultipartUploadResult>";
        assert_eq!(parse_initiate(init).as_deref(), Ok("VXBsb2FkIElE"));
        assert_eq!(
            parse_initiate("<UploadId>a b</UploadId>"),
            Err(AnswerError::BadUploadId("a b".into()))
        );
        assert_eq!(
            parse_initiate("<x/>"),
            Err(AnswerError::Missing("UploadId"))
        );
        let done = "<CompleteMultipartUploadResult><Location>l</Location><Bucket>b</Bucket>\
                    <Key>k</Key><ETag>&quot;3858f62230ac3c915f300c664312c11f-9&quot;</ETag>\
                    </CompleteMultipartUploadResult>";
        assert_eq!(
            parse_complete(done).as_deref(),
            Ok("3858f62230ac3c915f300c664312c11f-9")
        );
        let failed = "<?xml version=\"1.0\"?>\n\n<Error><Code>InternalError</Code></Error>";
        assert_eq!(
            parse_complete(failed),
            Err(AnswerError::Embedded {
                code: "InternalError".into()
            })
        );
        assert_eq!(
            complete_body(&[(1, "\"aa\"".into()), (2, "bb".into())]),
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"aa\"</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>\"bb\"</ETag></Part></CompleteMultipartUpload>"
        );
    }
}
