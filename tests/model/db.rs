//! The database side of the model: the `users` table, its version sequence, row locks and
//! unique-key waits, two writers running scripted transactions, and the notifications their
//! commits send.
//!
//! Faithful to PostgreSQL where the protocol depends on it:
//! * `role_version` is drawn when a statement runs: an UPDATE draws it after taking the row
//!   lock, an INSERT (and a change of `user_id`, for its new key) draws it before its unique
//!   check, which waits while another transaction holds the key;
//! * an UPDATE or DELETE sees the committed row (never another transaction's uncommitted one)
//!   and waits while another transaction holds its lock;
//! * a commit applies the transaction's writes atomically and sends one notification, delivered
//!   in commit order to the listener only if it is listening at that moment;
//! * TRUNCATE and bulk statements send a marker and record it in `role_resyncs`.

use rolecache::role::Role;

/// Users the model knows: keys 0 and 1.
pub const KEYS: usize = 2;
pub type Key = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Row {
    pub role: Role,
    pub version: i64,
}

/// One SQL statement of a writer's script.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stmt {
    Update(Key, Role),
    Delete(Key),
    Insert(Key, Role),
    /// `UPDATE users SET user_id = to WHERE user_id = from`.
    MoveId(Key, Key),
    Truncate,
    /// `UPDATE users SET role = ..` on every row: one marker instead of ids.
    Bulk(Role),
}

/// A writer's program: transactions run one after the other, each a list of statements.
pub type Script = &'static [&'static [Stmt]];

/// What a commit sends on `role_changes`. `states` is what a payload that carried rows would
/// say; the real listener ignores it (see `Safeguards::reread`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Notification {
    pub ids: u8,
    /// Ids the payload announces as inserted or deleted (a `user_id` change is both): the row
    /// may have been replaced by one with a lower version.
    pub replaced: u8,
    pub marker: bool,
    pub states: Vec<(Key, Option<Row>, u16)>,
}

/// A statement that has drawn its version and waits for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Waiting {
    No,
    Drawn(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Txn {
    /// Index of the next statement of the current transaction.
    pub stmt: usize,
    pub waiting: Waiting,
    /// The transaction's own writes: `Some(None)` is a deletion.
    pub overlay: [Option<Option<Row>>; KEYS],
    pub changed: u8,
    pub replaced: u8,
    pub marker: bool,
}

impl Txn {
    fn new() -> Self {
        Txn {
            stmt: 0,
            waiting: Waiting::No,
            overlay: [None; KEYS],
            changed: 0,
            replaced: 0,
            marker: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WriterState {
    /// Index of the current transaction in the script; `script.len()` when finished.
    pub txn_index: usize,
    pub txn: Txn,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Db {
    pub rows: [Option<Row>; KEYS],
    /// Commit number of the last commit that changed each key (0: the initial table). The
    /// "newness" of a key's state, known only to the model.
    pub stamps: [u16; KEYS],
    pub commits: u16,
    pub seq: i64,
    /// `max(role_resyncs.id)`.
    pub resyncs: u8,
    pub locks: [Option<u8>; KEYS],
    pub writers: Vec<WriterState>,
    /// Every live state each key ever had committed (for property (c)).
    pub history: Vec<(Key, Row)>,
}

/// What one writer step did.
pub enum StepResult {
    Ran,
    Blocked,
    Committed(Option<Notification>),
    Finished,
}

impl Db {
    pub fn new(rows: [Option<Row>; KEYS], writers: usize) -> Self {
        let seq = rows.iter().flatten().map(|r| r.version).max().unwrap_or(0) + 1;
        let mut history: Vec<(Key, Row)> = rows
            .iter()
            .enumerate()
            .filter_map(|(k, r)| r.map(|r| (k, r)))
            .collect();
        history.sort_by_key(|&(k, r)| (k, r.version, r.role as u8));
        Db {
            rows,
            stamps: [0; KEYS],
            commits: 0,
            seq,
            resyncs: 0,
            locks: [None; KEYS],
            writers: (0..writers)
                .map(|_| WriterState {
                    txn_index: 0,
                    txn: Txn::new(),
                })
                .collect(),
            history,
        }
    }

    pub fn finished(&self, w: usize, script: Script) -> bool {
        self.writers[w].txn_index >= script.len()
    }

    /// The row writer `w` sees: its own write if it holds the key, else the committed row.
    fn visible(&self, w: usize, k: Key) -> Option<Row> {
        match self.writers[w].txn.overlay[k] {
            Some(own) => own,
            None => self.rows[k],
        }
    }

    fn held_by_other(&self, w: usize, k: Key) -> bool {
        self.locks[k].is_some_and(|h| h as usize != w)
    }

    fn draw(&mut self) -> i64 {
        let v = self.seq;
        self.seq += 1;
        v
    }

    fn write(&mut self, w: usize, k: Key, row: Option<Row>) {
        self.locks[k] = Some(w as u8);
        let txn = &mut self.writers[w].txn;
        txn.overlay[k] = Some(row);
        txn.changed |= 1 << k;
    }

    /// The key writer `w` waits for, if it is blocked.
    pub fn blocked_on(&self, w: usize, script: Script) -> Option<Key> {
        let ws = &self.writers[w];
        let stmts = script.get(ws.txn_index)?;
        let stmt = stmts.get(ws.txn.stmt)?;
        let key = match (*stmt, ws.txn.waiting) {
            (Stmt::Update(k, _) | Stmt::Delete(k), _) if self.visible(w, k).is_some() => k,
            (Stmt::MoveId(a, _), Waiting::No) if self.visible(w, a).is_some() => a,
            (Stmt::MoveId(_, b), Waiting::Drawn(_)) => b,
            (Stmt::Insert(k, _), Waiting::Drawn(_)) => k,
            // TRUNCATE's ACCESS EXCLUSIVE lock waits for every other writer of the table.
            (Stmt::Truncate, _) => return (0..KEYS).find(|&k| self.held_by_other(w, k)),
            // An UPDATE of every row waits on the rows it sees that others hold.
            (Stmt::Bulk(_), _) => {
                return (0..KEYS)
                    .find(|&k| self.visible(w, k).is_some() && self.held_by_other(w, k));
            }
            _ => return None,
        };
        self.held_by_other(w, key).then_some(key)
    }

    /// Runs writer `w`'s next step: one statement phase, or its commit.
    pub fn step(&mut self, w: usize, script: Script) -> StepResult {
        let Some(stmts) = script.get(self.writers[w].txn_index) else {
            return StepResult::Finished;
        };
        if self.blocked_on(w, script).is_some() {
            return StepResult::Blocked;
        }
        let txn = &self.writers[w].txn;
        let Some(stmt) = stmts.get(txn.stmt).copied() else {
            return StepResult::Committed(self.commit(w));
        };
        let waiting = txn.waiting;
        let mut done = true;
        match (stmt, waiting) {
            (Stmt::Update(k, role), _) => {
                if self.visible(w, k).is_some() {
                    let version = self.draw();
                    self.write(w, k, Some(Row { role, version }));
                }
            }
            (Stmt::Delete(k), _) => {
                if self.visible(w, k).is_some() {
                    self.write(w, k, None);
                    self.writers[w].txn.replaced |= 1 << k;
                }
            }
            (Stmt::Insert(_, _), Waiting::No) => {
                let v = self.draw();
                self.writers[w].txn.waiting = Waiting::Drawn(v);
                done = false;
            }
            (Stmt::Insert(k, role), Waiting::Drawn(version)) => {
                if self.visible(w, k).is_some() {
                    self.abort(w);
                    return StepResult::Ran;
                }
                self.write(w, k, Some(Row { role, version }));
                self.writers[w].txn.replaced |= 1 << k;
            }
            (Stmt::MoveId(a, _), Waiting::No) => {
                if self.visible(w, a).is_some() {
                    self.locks[a] = Some(w as u8);
                    let v = self.draw();
                    self.writers[w].txn.waiting = Waiting::Drawn(v);
                    done = false;
                }
            }
            (Stmt::MoveId(a, b), Waiting::Drawn(version)) => {
                if self.visible(w, b).is_some() {
                    self.abort(w);
                    return StepResult::Ran;
                }
                // Held since the first phase, so still visible.
                let role = self.visible(w, a).map(|r| r.role).unwrap_or(Role::User);
                self.write(w, a, None);
                self.write(w, b, Some(Row { role, version }));
                // The triggers announce the old id as deleted and the new one as inserted.
                self.writers[w].txn.replaced |= (1 << a) | (1 << b);
            }
            (Stmt::Truncate, _) => {
                for k in 0..KEYS {
                    if self.visible(w, k).is_some() {
                        self.write(w, k, None);
                    }
                    self.locks[k] = Some(w as u8);
                }
                self.writers[w].txn.marker = true;
            }
            (Stmt::Bulk(role), _) => {
                for k in 0..KEYS {
                    if self.visible(w, k).is_some() {
                        let version = self.draw();
                        self.write(w, k, Some(Row { role, version }));
                    }
                }
                self.writers[w].txn.marker = true;
            }
        }
        if done {
            let txn = &mut self.writers[w].txn;
            txn.stmt += 1;
            txn.waiting = Waiting::No;
        }
        StepResult::Ran
    }

    fn release(&mut self, w: usize) {
        for lock in &mut self.locks {
            if *lock == Some(w as u8) {
                *lock = None;
            }
        }
        let ws = &mut self.writers[w];
        ws.txn_index += 1;
        ws.txn = Txn::new();
    }

    /// A unique violation (or a deadlock): the transaction rolls back and sends nothing.
    pub fn abort(&mut self, w: usize) {
        self.release(w);
    }

    fn commit(&mut self, w: usize) -> Option<Notification> {
        let txn = self.writers[w].txn.clone();
        self.commits += 1;
        let mut states = Vec::new();
        for k in 0..KEYS {
            if let Some(row) = txn.overlay[k] {
                if row != self.rows[k] {
                    self.rows[k] = row;
                    self.stamps[k] = self.commits;
                    if let Some(r) = row {
                        if !self.history.contains(&(k, r)) {
                            self.history.push((k, r));
                            self.history
                                .sort_by_key(|&(k, r)| (k, r.version, r.role as u8));
                        }
                    }
                }
                states.push((k, row, self.stamps[k]));
            }
        }
        if txn.marker {
            self.resyncs += 1;
        }
        self.release(w);
        let ids = if txn.marker { 0 } else { txn.changed };
        (ids != 0 || txn.marker).then_some(Notification {
            ids,
            replaced: ids & txn.replaced,
            marker: txn.marker,
            states,
        })
    }
}
