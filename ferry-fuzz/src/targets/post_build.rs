//! Targets for the uploader's parsers (`ferry-post-build`): upload target URLs and spool
//! records.

use super::text;

/// Upload target URLs (post-build/src/target.rs `parse_url`).
pub fn target_url(data: &[u8]) -> bool {
    use ferry_post_build::target::{TargetUrl, parse_url};
    let Ok(p) = parse_url(&text(data)) else {
        return false;
    };
    match p.location {
        TargetUrl::Http(u) => assert!(!u.ends_with('/')),
        TargetUrl::File(p) => assert!(p.is_absolute()),
        TargetUrl::S3(_) => {}
    }
    true
}

/// Spool records (post-build/src/spool.rs): a decoded record encodes and decodes back equal.
pub fn spool(data: &[u8]) -> bool {
    use ferry_post_build::spool::SpoolRecord;
    let Ok(rec) = SpoolRecord::decode(&text(data)) else {
        return false;
    };
    let enc = rec.encode().expect("a decoded record encodes");
    assert_eq!(SpoolRecord::decode(&enc), Ok(rec));
    true
}
