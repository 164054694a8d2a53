//! A model of the whole protocol — database, listener, cache, lookups, the bot's own writes and
//! an attacker — checked exhaustively (breadth-first) with stateright. Every write the model's
//! cache takes is decided by the code's own rule (`rolecache::cache::rule::decide`), so a change
//! to that rule changes what is checked here.
//!
//! # Layout
//!
//! * `db`: the `users` table, its sequence, row locks and unique-key waits, scripted writers,
//!   commits and the notifications they send;
//! * `protocol`: the instance (listener, cache, lookups, the bot's write, an attacker), the
//!   properties, and the safeguards the `*_bites` tests turn off one at a time;
//! * `scenarios`: tables and writers' scripts, each explored exhaustively;
//! * `replay`: the counterexamples the model found, replayed on the real cache.
//!
//! Run with `--nocapture` to see the states explored and every counterexample's trace.

mod db;
mod protocol;
mod replay;
mod scenarios;

use std::collections::BTreeSet;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Path};

use protocol::{Action, Protocol, Safeguards, Scenario, State, CONVERGES, MONOTONIC, NO_FORGERY};

fn model(scenario: &'static Scenario, safeguards: Safeguards) -> Protocol {
    Protocol {
        scenario,
        safeguards,
    }
}

/// Explores every state of `model` (breadth-first, one thread: the machine has two cores and
/// the test binaries run side by side). Returns the properties broken and the checker.
fn explore(model: Protocol) -> (BTreeSet<&'static str>, impl Checker<Protocol>) {
    let name = model.scenario.name;
    let started = Instant::now();
    let checker = model.checker().threads(1).spawn_bfs().join();
    println!(
        "{name}: {} states ({} unique), depth {}, {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    let broken = [MONOTONIC, CONVERGES, NO_FORGERY]
        .into_iter()
        .filter(|p| checker.discovery(p).is_some())
        .collect();
    (broken, checker)
}

/// The first counterexample to `property` breadth-first (a shortest one), printed; `None` if the
/// model keeps it.
fn counterexample(model: Protocol, property: &'static str) -> Option<Path<State, Action>> {
    let checker = model
        .checker()
        .threads(1)
        .finish_when(HasDiscoveries::AnyOf([property].into()))
        .spawn_bfs()
        .join();
    let path = checker.discovery(property)?;
    print_trace(property, &path);
    Some(path)
}

/// Every property, the "sometimes" ones included, in every scenario, with the code's rule.
#[test]
fn the_code_rule_keeps_every_property_in_every_scenario() {
    let mut broken_anywhere = Vec::new();
    for scenario in scenarios::ALL {
        let (broken, checker) = explore(model(scenario, Safeguards::ALL));
        for property in &broken {
            counterexample(model(scenario, Safeguards::ALL), property);
            broken_anywhere.push((scenario.name, *property));
        }
        if broken.is_empty() {
            // The "sometimes" properties: the scenario is not vacuous.
            checker.assert_properties();
        }
    }
    assert!(broken_anywhere.is_empty(), "broken: {broken_anywhere:?}");
}

/// Checks that `scenario` keeps `property` with every safeguard, and breaks it without the one
/// `remove` takes away.
fn bites(scenario: &'static Scenario, property: &'static str, remove: fn(&mut Safeguards)) {
    let (broken, _) = explore(model(scenario, Safeguards::ALL));
    assert!(
        !broken.contains(property),
        "{}: broken even with every safeguard",
        scenario.name
    );
    let mut without = Safeguards::ALL;
    remove(&mut without);
    let found = counterexample(model(scenario, without), property);
    assert!(
        found.is_some(),
        "{}: still kept without the safeguard",
        scenario.name
    );
}

#[test]
fn without_the_epoch_check_a_write_begun_before_the_session_stays_cached() {
    bites(&scenarios::UPDATES, CONVERGES, |s| s.epoch_check = false);
}

#[test]
fn without_removal_of_absent_rows_a_deleted_user_stays_cached() {
    bites(&scenarios::DELETE, CONVERGES, |s| s.removal = false);
}

#[test]
fn without_the_session_flush_a_write_begun_before_the_session_stays_cached() {
    bites(&scenarios::UPDATES, CONVERGES, |s| {
        s.reconnect_flush = false
    });
}

/// The removal of a replaced row before its re-read was needed while re-reads were gated by
/// version; with the code's rule the re-read alone converges, and adding the removal back
/// breaks nothing either.
#[test]
fn a_reinserted_user_converges_with_or_without_removing_the_replaced_row_first() {
    for scenario in [
        &scenarios::REINSERT_LISTENER_ONLY,
        &scenarios::DELETE_REINSERT,
    ] {
        for replace_hint in [false, true] {
            let mut safeguards = Safeguards::ALL;
            safeguards.replace_hint = replace_hint;
            let (broken, _) = explore(model(scenario, safeguards));
            assert!(
                broken.is_empty(),
                "{} (replace_hint {replace_hint}): {broken:?}",
                scenario.name
            );
        }
    }
}

/// Without the tickets, a load (or re-read) that read the row before another write of it
/// finished still stores what it read.
#[test]
fn without_the_tickets_a_slow_load_stores_a_deleted_users_role() {
    bites(&scenarios::DELETE_RACING_LOADS, CONVERGES, |s| {
        s.tickets = false
    });
}

/// ... and a lookup is served an older state than one already returned.
#[test]
fn without_the_tickets_a_lookup_is_served_an_older_state_than_one_returned() {
    bites(&scenarios::DELETE_RACING_LOADS, MONOTONIC, |s| {
        s.tickets = false
    });
}

#[test]
fn trusting_payloads_lets_an_attacker_cache_a_role() {
    bites(&scenarios::ATTACKER, NO_FORGERY, |s| s.reread = false);
}

/// Prints a counterexample one step a line: the action, then the table and the cache after it.
fn print_trace(property: &str, path: &Path<State, Action>) {
    fn row(r: Option<db::Row>) -> String {
        r.map_or("-".into(), |r| format!("{} v{}", r.role, r.version))
    }
    println!("counterexample to {property}:");
    let steps = path.clone().into_vec();
    for (i, pair) in steps.windows(2).enumerate() {
        let (Some(action), after) = (&pair[0].1, &pair[1].0) else {
            continue;
        };
        let table: Vec<String> = after.db.rows.iter().map(|r| row(*r)).collect();
        let cache: Vec<String> = after
            .cache
            .iter()
            .map(|c| {
                c.map_or("-".into(), |c| {
                    let state = match c.role {
                        Some(role) => row(Some(db::Row {
                            role,
                            version: c.version,
                        })),
                        None => format!("none v{}", c.version),
                    };
                    format!("{state} @e{}", c.epoch)
                })
            })
            .collect();
        println!(
            "  {:>2}. {:<20} table [{}]  cache [{}]  epoch {}{}",
            i + 1,
            format!("{action:?}"),
            table.join(", "),
            cache.join(", "),
            after.epoch,
            if after.synced { " synced" } else { "" },
        );
    }
}
