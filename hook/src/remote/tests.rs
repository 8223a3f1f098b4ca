use super::*;

#[test]
fn exit_codes_follow_the_remote_status() {
    let f = |status| RemoteError::BuildFailed {
        drv: "d".into(),
        machine: "m".into(),
        status,
        message: "x".into(),
    };
    assert_eq!(f(BuildStatus::TimedOut).exit_code(), 101);
    assert_eq!(f(BuildStatus::PermanentFailure).exit_code(), 100);
    assert_eq!(f(BuildStatus::OutputRejected).exit_code(), 100);
    assert_eq!(f(BuildStatus::MiscFailure).exit_code(), 1);
    assert_eq!(f(BuildStatus::Unknown(77)).exit_code(), 1);
    assert_eq!(
        crate::fault::classify(&f(BuildStatus::MiscFailure), ""),
        crate::fault::Fault::Final
    );
}
