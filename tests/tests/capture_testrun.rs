//! BPF_PROG_TEST_RUN hands crafted frames straight to the program, VLAN tags still in the
//! bytes (no interface moves the outer one to metadata): parser edge cases, and proof that the
//! program never acts on or changes a packet.

mod common;

use std::time::Duration;

use collector::capture::CaptureConfig;
use collector_common::Counter;
use common::{frames::*, *};

/// TC_ACT_UNSPEC: "continue" (TCX_NEXT), never drop, redirect or pass-and-stop.
const CONTINUE: i32 = -1;

/// Frames the test run itself refuses (EINVAL: it wants a whole IP header); the veth test
/// covers them on the real path.
const REFUSED: [&str; 2] = ["IPv4 header cut", "IPv6 header cut"];

fn refused(run: Result<collector::capture::TestRun, collector::capture::CaptureError>) -> bool {
    matches!(
        run,
        Err(collector::capture::CaptureError::TestRun(e)) if e.raw_os_error() == Some(libc::EINVAL)
    )
}

#[tokio::test]
async fn every_frame_continues_unchanged_and_moves_its_counter() {
    // Attached to a port on lo that nothing uses: test runs are the only captured traffic.
    let mut cap = TestCapture::start_with(CaptureConfig::new("lo", vec![PORT]));
    for case in cases() {
        // With every tag in the bytes, three tags are one too many.
        let counter = if case.name == "three tags" {
            Counter::VlanTooDeep
        } else {
            case.counter
        };
        let before = cap.counters();
        if REFUSED.contains(&case.name) {
            assert!(
                refused(cap.capture.test_run(&case.frame, 1)),
                "{}",
                case.name
            );
            continue;
        }
        let run = cap.capture.test_run(&case.frame, 1).unwrap();
        let after = cap.counters();
        assert_eq!(run.retval, CONTINUE, "{}", case.name);
        assert_eq!(run.frame_out, case.frame, "{}: frame changed", case.name);
        assert_eq!(
            delta(&before, &after, counter),
            1,
            "{}: {counter:?}",
            case.name
        );
        let want = u64::from(case.record.is_some() && case.name != "three tags");
        assert_eq!(
            delta(&before, &after, Counter::Records),
            want,
            "{}",
            case.name
        );
    }
    let expected = cases()
        .iter()
        .filter(|c| c.record.is_some() && c.name != "three tags")
        .count();
    cap.collect_until(Duration::from_secs(5), "records", |r, _| {
        r.len() >= expected
    })
    .await;
    let (control, payload): (Vec<_>, Vec<_>) = cap.records.iter().partition(|r| r.data.is_empty());
    assert!(
        payload
            .iter()
            .all(|r| &r.data[..] == b"\x05\x00\x00\x00\x03hello")
    );
    // Header-only records: exactly the SYN/FIN/RST cases, flags as sent.
    let controls = cases()
        .iter()
        .filter(|c| c.counter == Counter::Control)
        .count();
    assert_eq!(control.len(), controls);
    assert!(
        control
            .iter()
            .all(|r| r.tcp_flags & 0x07 != 0 && r.segment_len == 0)
    );
}

#[tokio::test]
async fn frames_shorter_than_ethernet_are_refused_by_the_kernel_not_parsed() {
    let cap = TestCapture::start_with(CaptureConfig::new("lo", vec![PORT]));
    // The test run needs a whole Ethernet header; shorter frames never reach any program.
    assert!(refused(cap.capture.test_run(&[0u8; 10], 1)));
    let before = cap.counters();
    assert!(cap.capture.test_run(&[0u8; 14], 1).is_ok());
    assert_eq!(delta(&before, &cap.counters(), Counter::NotIp), 1);
}
