use super::*;

#[test]
fn network_blips_and_5xx_are_transient_other_answers_are_not() {
    use FailureKind::*;
    for (e, k) in [
        (FetchError::Connect("refused".into()), Transient),
        (FetchError::Timeout, Transient),
        (FetchError::Transfer("reset".into()), Transient),
        (FetchError::Status(500), Transient),
        (FetchError::Status(503), Transient),
        (FetchError::Status(429), Permanent),
        (FetchError::Status(400), Permanent),
        (FetchError::TooLarge(1), Permanent),
        (FetchError::BadRange("x".into()), Permanent),
    ] {
        assert_eq!(e.kind(), k, "{e}");
    }
}
