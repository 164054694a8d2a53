//! The instance side of the model and the `stateright::Model` that runs both sides: the
//! listener (connect, LISTEN, baseline, flush, re-read, overflow, failure at any step), the
//! cache (every write decided by the code's own rule, eviction at any step), lookups whose
//! miss-loads interleave anywhere, the bot's own write path, and an attacker's notifications.

use rolecache::cache::rule::{decide, Decision, Slot, Writer};
use rolecache::role::{Role, RoleState};
use stateright::{Model, Property};

use crate::db::{Db, Key, Notification, Row, Script, StepResult, KEYS};

/// Property (a): no lookup returns a state older than the newest one the instance had applied
/// to the cache or returned (to a lookup, or the bot's own write) before that lookup began.
pub const MONOTONIC: &str = "(a) no lookup returns a state older than one already seen";
/// Property (b): once writes stop and the listener is connected and drained, every servable
/// cached entry equals the table.
pub const CONVERGES: &str = "(b) at quiescence every cached entry equals the table";
/// Property (c): every servable cached role is a state the table had: nothing an attacker sends
/// puts a role in the cache.
pub const NO_FORGERY: &str = "(c) every cached role was committed to the table";

/// One configuration of writers and table: the model is checked once per scenario.
pub struct Scenario {
    pub name: &'static str,
    pub rows: [Option<Row>; KEYS],
    pub scripts: [Script; 2],
    /// The writer whose transaction is the bot's own write (ticket before, RETURNING after).
    pub bot: Option<usize>,
    /// Keys lookups may ask for (bit mask).
    pub lookup_keys: u8,
    pub lookups: u8,
    pub concurrent_lookups: usize,
    /// Listener sessions that may die.
    pub failures: u8,
    pub attacks: &'static [Attack],
    pub queue_capacity: usize,
}

/// A notification anyone who can connect may send on `role_changes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attack {
    /// A payload naming `key` (and, for a listener that trusts payloads, making it an owner).
    Promote(Key),
    /// A resync marker (or a payload that does not parse).
    Marker,
}

/// The protocol's safeguards; each test of the "shown to bite" set turns one off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Safeguards {
    /// Slots carry the epoch of their write; an older epoch is neither written nor served.
    pub epoch_check: bool,
    /// A re-read that finds no row removes the key.
    pub removal: bool,
    /// A new session flushes the cache (new epoch) before marking it synced.
    pub reconnect_flush: bool,
    /// Notifications are hints; what is cached comes from re-reading the table.
    pub reread: bool,
    /// A row announced as inserted or deleted is removed before its re-read state is stored.
    /// An earlier listener did this because its rule gated re-reads by version; the code's rule
    /// no longer does (re-reads are the newest state), so the code leaves it out and
    /// [`Safeguards::ALL`] has it off. Turned on, it must change nothing the checker can see.
    pub replace_hint: bool,
    /// A write stores only if its ticket is current: no other write of the key finished since
    /// the writer took it, before its read.
    pub tickets: bool,
}

impl Safeguards {
    pub const ALL: Safeguards = Safeguards {
        epoch_check: true,
        removal: true,
        reconnect_flush: true,
        reread: true,
        replace_hint: false,
        tickets: true,
    };
}

pub struct Protocol {
    pub scenario: &'static Scenario,
    pub safeguards: Safeguards,
}

/// A cache slot: what the code stores, plus the commit number of the state (model only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CachedSlot {
    pub role: Option<Role>,
    pub version: i64,
    pub epoch: u64,
    pub stamp: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Down,
    Connected,
    Listening,
    Baselined,
    Flushed,
    Synced,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RereadStage {
    Query {
        ids: u8,
        replaced: u8,
        marker: bool,
    },
    /// Rows read (or, without the re-read, taken from payloads), applied one key at a time.
    Apply(Vec<Reapply>),
}

/// One row to apply: `remove_first` while the removal of a replaced row is still to be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reapply {
    pub key: Key,
    pub row: Option<Row>,
    pub stamp: u16,
    pub remove_first: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reread {
    /// The epoch the rows are applied in: read just before the query (set again there).
    pub epoch: u64,
    /// The keys' change counters, read with the epoch; each of the re-read's own writes
    /// advances its key's (`LoadTicket` follows its holder's writes).
    pub tickets: [u64; KEYS],
    pub stage: RereadStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub changes_seen: [u64; KEYS],
    pub epoch: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LookupStage {
    /// Missed the cache; `synced` as seen then (false: a bypass read, nothing cached).
    Missed {
        synced: bool,
    },
    Ticketed(Ticket),
    Read(Ticket, Option<Row>, u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lookup {
    pub key: Key,
    /// The newest commit of this key the instance had applied or read when the lookup began.
    pub floor: u16,
    pub stage: LookupStage,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub db: Db,
    pub phase: Phase,
    /// The session is gone but the listener has not noticed yet.
    pub dead: bool,
    pub failures_left: u8,
    pub queue: Vec<Notification>,
    pub overflow: bool,
    pub baseline: u8,
    pub epoch: u64,
    pub synced: bool,
    /// Per key, the writes of it that finished (the code's change counter, one per key here:
    /// the code's stripes only make the check stricter).
    pub changes_seen: [u64; KEYS],
    pub cache: [Option<CachedSlot>; KEYS],
    pub reread: Option<Reread>,
    pub lookups: Vec<Lookup>,
    pub lookups_left: u8,
    /// Per key, the newest commit the instance applied or read from the table.
    pub watermark: [u16; KEYS],
    pub bot_ticket: Option<Ticket>,
    pub bot_store: Option<(Key, Option<Row>, u16, Ticket)>,
    pub attacks_left: u8,
    /// A lookup returned a state older than its floor (property (a) broken).
    pub stale_served: bool,
    pub served_from_cache: bool,
    /// The queue overflowed at least once (coverage).
    pub overflowed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Write(usize),
    DeadlockAbort(usize),
    Connect,
    Listen,
    Baseline,
    Flush,
    MarkSynced,
    SessionDies,
    NoticeLoss,
    Drain,
    Query,
    Apply,
    Lookup(Key),
    Ticket(usize),
    Read(usize),
    Store(usize),
    BotStore,
    Evict(Key),
    Attack(Attack),
}

impl Protocol {
    fn delivering(s: &State) -> bool {
        s.phase >= Phase::Listening && !s.dead
    }

    fn deliver(&self, s: &mut State, n: Notification) {
        if !Self::delivering(s) {
            return;
        }
        if s.queue.len() < self.scenario.queue_capacity {
            s.queue.push(n);
        } else {
            s.overflow = true;
            s.overflowed = true;
        }
    }

    fn flush(s: &mut State) {
        s.epoch += 1;
        // moka's invalidate_all: what was inserted before the call is gone, later inserts stay.
        s.cache = [None; KEYS];
    }

    fn servable(&self, s: &State, slot: &CachedSlot) -> bool {
        !self.safeguards.epoch_check || slot.epoch == s.epoch
    }

    /// The code's write rule, with the epoch check removed when the safeguard is off.
    fn write(
        &self,
        s: &mut State,
        key: Key,
        state: Option<Row>,
        stamp: u16,
        epoch: u64,
        writer: Writer,
    ) {
        let to_state = Self::role_state;
        let (current, new_epoch) = if self.safeguards.epoch_check {
            (s.epoch, epoch)
        } else {
            (s.epoch, s.epoch)
        };
        let existing = s.cache[key].map(|c| Slot {
            state: RoleState {
                role: c.role,
                version: c.version,
            },
            epoch: if self.safeguards.epoch_check {
                c.epoch
            } else {
                s.epoch
            },
        });
        let new = Slot {
            state: to_state(state),
            epoch: new_epoch,
        };
        let seen_now = match writer {
            // Without the check, every ticket looks current.
            Writer::Reread { changes_seen } | Writer::Load { changes_seen }
                if !self.safeguards.tickets =>
            {
                changes_seen
            }
            _ => s.changes_seen[key],
        };
        let decision = decide(current, existing, new, writer, seen_now);
        // Every write finishes by bumping its key's counter, under the key's lock.
        s.changes_seen[key] += 1;
        match decision {
            Decision::Put => {
                Self::seen(s, key, stamp);
                s.cache[key] = Some(CachedSlot {
                    role: new.state.role,
                    version: new.state.version,
                    epoch,
                    stamp,
                });
            }
            Decision::Remove => s.cache[key] = None,
            Decision::Keep(_) => {}
        }
    }

    /// What the code passes for a row read: `None` (no row) is a tombstone of version 0.
    fn role_state(row: Option<Row>) -> RoleState {
        match row {
            Some(r) => RoleState::present(r.role, r.version),
            None => RoleState::deleted(0),
        }
    }

    fn read_row(s: &State, key: Key) -> (Option<Row>, u16) {
        (s.db.rows[key], s.db.stamps[key])
    }

    /// Lookup `l` returned the state committed at `stamp`: property (a) is checked here.
    fn returned(s: &mut State, l: Lookup, stamp: u16) {
        if stamp < l.floor {
            s.stale_served = true;
        }
        Self::seen(s, l.key, stamp);
    }

    /// The instance acted on (returned or applied) the state of `key` committed at `stamp`.
    fn seen(s: &mut State, key: Key, stamp: u16) {
        s.watermark[key] = s.watermark[key].max(stamp);
    }

    pub fn quiescent(&self, s: &State) -> bool {
        (0..2).all(|w| s.db.finished(w, self.scenario.scripts[w]))
            && s.bot_store.is_none()
            && s.lookups.is_empty()
            && s.phase == Phase::Synced
            && !s.dead
            && s.queue.is_empty()
            && !s.overflow
            && s.reread.is_none()
    }

    fn cache_matches_table(&self, s: &State) -> bool {
        (0..KEYS).all(|k| match s.cache[k] {
            Some(slot) if self.servable(s, &slot) => match (slot.role, s.db.rows[k]) {
                (None, None) => true,
                (Some(role), Some(row)) => row.role == role && row.version == slot.version,
                _ => false,
            },
            _ => true,
        })
    }

    fn cached_roles_were_committed(&self, s: &State) -> bool {
        (0..KEYS).all(|k| match s.cache[k] {
            Some(slot) if self.servable(s, &slot) => slot.role.is_none_or(|role| {
                s.db.history.contains(&(
                    k,
                    Row {
                        role,
                        version: slot.version,
                    },
                ))
            }),
            _ => true,
        })
    }

    fn forged(attack: Attack) -> Notification {
        match attack {
            Attack::Promote(k) => Notification {
                ids: 1 << k,
                // Announced as an insert: costs at most a removal.
                replaced: 1 << k,
                marker: false,
                states: vec![(
                    k,
                    Some(Row {
                        role: Role::Owner,
                        version: 99,
                    }),
                    0,
                )],
            },
            Attack::Marker => Notification {
                ids: 0,
                replaced: 0,
                marker: true,
                states: vec![],
            },
        }
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let sc = self.scenario;
        vec![State {
            db: Db::new(sc.rows, 2),
            phase: Phase::Down,
            dead: false,
            failures_left: sc.failures,
            queue: vec![],
            overflow: false,
            baseline: 0,
            epoch: 0,
            synced: false,
            changes_seen: [0; KEYS],
            cache: [None; KEYS],
            reread: None,
            lookups: vec![],
            lookups_left: sc.lookups,
            watermark: [0; KEYS],
            bot_ticket: None,
            bot_store: None,
            attacks_left: sc.attacks.len() as u8,
            stale_served: false,
            served_from_cache: false,
            overflowed: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let sc = self.scenario;
        for w in 0..2 {
            let script = sc.scripts[w];
            if s.db.finished(w, script) {
                continue;
            }
            match s.db.blocked_on(w, script) {
                None => actions.push(Action::Write(w)),
                Some(k) => {
                    // A deadlock: the holder waits for a key this writer holds.
                    let holder = s.db.locks[k].map(|h| h as usize);
                    if let Some(h) = holder {
                        let theirs = s.db.blocked_on(h, sc.scripts[h]);
                        if theirs.is_some_and(|k2| s.db.locks[k2] == Some(w as u8)) {
                            actions.push(Action::DeadlockAbort(w));
                        }
                    }
                }
            }
        }
        if s.dead {
            actions.push(Action::NoticeLoss);
        } else {
            match s.phase {
                Phase::Down => actions.push(Action::Connect),
                Phase::Connected => actions.push(Action::Listen),
                Phase::Listening => actions.push(Action::Baseline),
                Phase::Baselined if self.safeguards.reconnect_flush => actions.push(Action::Flush),
                Phase::Baselined | Phase::Flushed => actions.push(Action::MarkSynced),
                Phase::Synced => {}
            }
            if s.phase != Phase::Down && s.failures_left > 0 {
                actions.push(Action::SessionDies);
            }
        }
        if s.phase == Phase::Synced && s.reread.is_none() && (!s.queue.is_empty() || s.overflow) {
            actions.push(Action::Drain);
        }
        match &s.reread {
            Some(Reread {
                stage: RereadStage::Query { .. },
                ..
            }) if !s.dead => actions.push(Action::Query),
            Some(Reread {
                stage: RereadStage::Apply(_),
                ..
            }) => actions.push(Action::Apply),
            _ => {}
        }
        if s.lookups_left > 0 && s.lookups.len() < sc.concurrent_lookups {
            for k in 0..KEYS {
                if sc.lookup_keys & (1 << k) != 0 {
                    actions.push(Action::Lookup(k));
                }
            }
        }
        for (i, l) in s.lookups.iter().enumerate() {
            actions.push(match l.stage {
                LookupStage::Missed { synced: true } => Action::Ticket(i),
                LookupStage::Missed { synced: false } | LookupStage::Ticketed(_) => Action::Read(i),
                LookupStage::Read(..) => Action::Store(i),
            });
        }
        if s.bot_store.is_some() {
            actions.push(Action::BotStore);
        }
        for k in 0..KEYS {
            if s.cache[k].is_some() {
                actions.push(Action::Evict(k));
            }
        }
        if s.attacks_left > 0 && Self::delivering(s) {
            let attack = sc.attacks[sc.attacks.len() - s.attacks_left as usize];
            actions.push(Action::Attack(attack));
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let sc = self.scenario;
        let mut s = last.clone();
        match action {
            Action::Write(w) => {
                let script = sc.scripts[w];
                let is_bot = sc.bot == Some(w);
                let txn_before = s.db.writers[w].txn_index;
                if is_bot && s.bot_ticket.is_none() {
                    // The bot takes its ticket before its transaction starts, synced or not
                    // (`bot::actions`); a flush in between makes its store an old epoch's.
                    s.bot_ticket = Some(Ticket {
                        changes_seen: s.changes_seen,
                        epoch: s.epoch,
                    });
                }
                match s.db.step(w, script) {
                    StepResult::Committed(n) => {
                        if let (true, Some(n)) = (is_bot, &n) {
                            if let (Some(ticket), Some(&(k, row, stamp))) =
                                (s.bot_ticket, n.states.first())
                            {
                                s.bot_store = Some((k, row, stamp, ticket));
                            }
                        }
                        if is_bot {
                            s.bot_ticket = None;
                        }
                        if let Some(n) = n {
                            self.deliver(&mut s, n);
                        }
                    }
                    StepResult::Ran if s.db.writers[w].txn_index != txn_before => {
                        // Rolled back (unique violation): nothing sent, nothing to store.
                        if is_bot {
                            s.bot_ticket = None;
                        }
                    }
                    StepResult::Ran => {}
                    StepResult::Blocked | StepResult::Finished => return None,
                }
            }
            Action::DeadlockAbort(w) => {
                s.db.abort(w);
                if sc.bot == Some(w) {
                    s.bot_ticket = None;
                }
            }
            Action::Connect => s.phase = Phase::Connected,
            Action::Listen => s.phase = Phase::Listening,
            Action::Baseline => {
                s.baseline = s.db.resyncs;
                s.phase = Phase::Baselined;
            }
            Action::Flush => {
                Self::flush(&mut s);
                s.phase = Phase::Flushed;
            }
            Action::MarkSynced => {
                s.synced = true;
                s.phase = Phase::Synced;
            }
            Action::SessionDies => {
                s.dead = true;
                s.failures_left -= 1;
            }
            Action::NoticeLoss => {
                s.dead = false;
                s.phase = Phase::Down;
                s.synced = false;
                s.epoch += 1;
                s.queue.clear();
                s.overflow = false;
                s.reread = None;
            }
            Action::Drain => {
                if s.overflow {
                    Self::flush(&mut s);
                    s.overflow = false;
                }
                let queue = std::mem::take(&mut s.queue);
                if self.safeguards.reread {
                    let ids = queue.iter().fold(0, |acc, n| acc | n.ids);
                    let replaced = queue.iter().fold(0, |acc, n| acc | n.replaced);
                    let marker = queue.iter().any(|n| n.marker);
                    if ids != 0 || marker {
                        s.reread = Some(Reread {
                            epoch: s.epoch,
                            tickets: s.changes_seen,
                            stage: RereadStage::Query {
                                ids,
                                replaced,
                                marker,
                            },
                        });
                    }
                } else {
                    // Trusting payloads: a marker flushes; rows after the last one are applied.
                    let last_marker = queue.iter().rposition(|n| n.marker);
                    if last_marker.is_some() {
                        Self::flush(&mut s);
                    }
                    let start = last_marker.map_or(0, |i| i + 1);
                    let mut rows: Vec<Reapply> = vec![];
                    for n in &queue[start..] {
                        for &(key, row, stamp) in &n.states {
                            rows.retain(|r| r.key != key);
                            rows.push(Reapply {
                                key,
                                row,
                                stamp,
                                remove_first: false,
                            });
                        }
                    }
                    if !rows.is_empty() {
                        s.reread = Some(Reread {
                            epoch: s.epoch,
                            tickets: s.changes_seen,
                            stage: RereadStage::Apply(rows),
                        });
                    }
                }
            }
            Action::Query => {
                let Some(Reread {
                    stage:
                        RereadStage::Query {
                            ids,
                            replaced,
                            marker,
                        },
                    ..
                }) = s.reread.clone()
                else {
                    return None;
                };
                // The ticket (epoch and the keys' counters) is taken just before the query
                // (`Listener::handle`).
                let epoch = s.epoch;
                let tickets = s.changes_seen;
                let mut rows = vec![];
                for key in 0..KEYS {
                    if ids & (1 << key) != 0 {
                        let (row, stamp) = Self::read_row(&s, key);
                        let remove_first = self.safeguards.replace_hint
                            && row.is_some()
                            && replaced & (1 << key) != 0;
                        rows.push(Reapply {
                            key,
                            row,
                            stamp,
                            remove_first,
                        });
                    }
                }
                if marker && s.db.resyncs > s.baseline {
                    // The flush covers every row named in this drain.
                    s.baseline = s.db.resyncs;
                    Self::flush(&mut s);
                    rows.clear();
                }
                s.reread = (!rows.is_empty()).then_some(Reread {
                    epoch,
                    tickets,
                    stage: RereadStage::Apply(rows),
                });
            }
            Action::Apply => {
                let Some(Reread {
                    epoch,
                    mut tickets,
                    stage: RereadStage::Apply(mut rows),
                }) = s.reread.clone()
                else {
                    return None;
                };
                let head = rows.remove(0);
                let writer = Writer::Reread {
                    changes_seen: tickets[head.key],
                };
                if head.remove_first {
                    // A write of its own under moka's lock: lookups may run in between.
                    self.write(&mut s, head.key, None, head.stamp, epoch, writer);
                    tickets[head.key] += 1;
                    let rest = Reapply {
                        remove_first: false,
                        ..head
                    };
                    rows.insert(0, rest);
                } else if head.row.is_some() || self.safeguards.removal {
                    self.write(&mut s, head.key, head.row, head.stamp, epoch, writer);
                    tickets[head.key] += 1;
                }
                s.reread = (!rows.is_empty()).then_some(Reread {
                    epoch,
                    tickets,
                    stage: RereadStage::Apply(rows),
                });
            }
            Action::Lookup(k) => {
                s.lookups_left -= 1;
                let floor = s.watermark[k];
                match s.cache[k] {
                    Some(slot) if s.synced && self.servable(&s, &slot) => {
                        s.served_from_cache = true;
                        let hit = Lookup {
                            key: k,
                            floor,
                            stage: LookupStage::Missed { synced: true },
                        };
                        Self::returned(&mut s, hit, slot.stamp);
                    }
                    _ => s.lookups.push(Lookup {
                        key: k,
                        floor,
                        stage: LookupStage::Missed { synced: s.synced },
                    }),
                }
            }
            Action::Ticket(i) => {
                s.lookups[i].stage = LookupStage::Ticketed(Ticket {
                    changes_seen: s.changes_seen,
                    epoch: s.epoch,
                });
            }
            Action::Read(i) => {
                let l = s.lookups[i];
                let (row, stamp) = Self::read_row(&s, l.key);
                match l.stage {
                    LookupStage::Ticketed(t) => {
                        s.lookups[i].stage = LookupStage::Read(t, row, stamp)
                    }
                    // A bypass read: returned as read, nothing stored, but a slot that
                    // differs from it is removed.
                    _ => {
                        s.lookups.remove(i);
                        let epoch = s.epoch;
                        self.write(&mut s, l.key, row, stamp, epoch, Writer::Bypass);
                        Self::returned(&mut s, l, stamp);
                    }
                }
            }
            Action::Store(i) => {
                let l = s.lookups.remove(i);
                let LookupStage::Read(ticket, row, stamp) = l.stage else {
                    return None;
                };
                let writer = Writer::Load {
                    changes_seen: ticket.changes_seen[l.key],
                };
                self.write(&mut s, l.key, row, stamp, ticket.epoch, writer);
                Self::returned(&mut s, l, stamp);
            }
            Action::BotStore => {
                let (k, row, stamp, ticket) = s.bot_store.take()?;
                let writer = Writer::Load {
                    changes_seen: ticket.changes_seen[k],
                };
                self.write(&mut s, k, row, stamp, ticket.epoch, writer);
                // The bot acts on its own write once it is stored (or refused).
                Self::seen(&mut s, k, stamp);
            }
            Action::Evict(k) => s.cache[k] = None,
            Action::Attack(attack) => {
                s.attacks_left -= 1;
                self.deliver(&mut s, Self::forged(attack));
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(MONOTONIC, |_: &Protocol, s: &State| !s.stale_served),
            Property::always(CONVERGES, |m: &Protocol, s: &State| {
                !m.quiescent(s) || m.cache_matches_table(s)
            }),
            Property::always(NO_FORGERY, |m: &Protocol, s: &State| {
                m.cached_roles_were_committed(s)
            }),
            // Not vacuous: hits happen, and quiescence is reached with something cached.
            Property::sometimes(
                "a lookup is served from the cache where the scenario has lookups",
                |m: &Protocol, s: &State| s.served_from_cache || m.scenario.lookups == 0,
            ),
            Property::sometimes(
                "the queue overflows and the session dies where the scenario allows it",
                |m: &Protocol, s: &State| {
                    let sc = m.scenario;
                    (s.overflowed || sc.queue_capacity > 1)
                        && (s.failures_left == 0)
                        && (s.attacks_left == 0)
                },
            ),
            Property::sometimes(
                "quiescence is reached with an entry cached",
                |m: &Protocol, s: &State| {
                    m.quiescent(s) && s.cache.iter().flatten().any(|c| m.servable(s, c))
                },
            ),
        ]
    }
}
