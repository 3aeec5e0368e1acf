//! The tenant move and the shard-map lifecycle as a state machine, checked
//! exhaustively by `stateright` within small bounds.
//!
//! Run it with `cargo test --release --test move_model -- --nocapture`: each
//! bound prints the states it explored and whether the space was exhausted.
//!
//! **Actors.** The control database (maps by version, the move record with its
//! phase, intent, lease and fencing token; it can be restored from a dump taken
//! earlier), two routers (each with the map it applied; one can be cut off from
//! the control database, which also covers a paused process, and requests in
//! flight keep the version they started with), movers (every step of
//! `src/moves` is a transition; a mover can crash or lose its control
//! connection anywhere, a second one can be started by `resume`, `abort` or
//! `plan --apply`), an operator (publish from git, rollback, abort, resume,
//! `plan --apply`, restore), two shards (the tenant's rows, the fence row, the
//! movers' claim) and writers (a write is acknowledged, refused, or ambiguous).
//!
//! **Transitions are named as the code's steps** (`Pc`), so a trace reads as
//! the functions the real mover ran; the moves guide maps each one to its code.
//!
//! **Fixes are switches** (`Fixes`): the bite tests turn one off and show that
//! the checker finds the violation it prevents, and prints the trace.
//!
//! Simplifications, each stated so a reader can judge them: a write inserts a
//! new row (creates only; updates and deletes change rows in place and are
//! covered by the row images the real writer applies); the tenant's existing
//! data is one row (`BASE`) on the source; "the tenant lock" is one lock on the
//! move's source shard; reads are not fenced for a router that is cut off, so
//! the routing invariant covers the newest map and every connected router; a
//! router that reconnects applies the newest map before it serves again; the
//! source purge (a separate, later command) is not modelled.

use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Property};

// ---------------------------------------------------------------------------
// The pieces of the state
// ---------------------------------------------------------------------------

/// The two shards. Every move in the model goes from one to the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Shard {
    A,
    B,
}

impl Shard {
    fn other(self) -> Shard {
        match self {
            Shard::A => Shard::B,
            Shard::B => Shard::A,
        }
    }
    fn i(self) -> usize {
        self as usize
    }
}

/// Where one map version sends the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Placement {
    /// Pinned (or placed by the ring) on a shard.
    On(Shard),
    /// `[moves.t] phase = "dual_write"`: reads and the primary are `from`.
    DualWrite { from: Shard, to: Shard },
    /// `phase = "reversed"`: reads and the primary are `to`.
    Reversed { from: Shard, to: Shard },
}

impl Placement {
    /// The shard that serves reads and is the writes' primary.
    fn reads(self) -> Shard {
        match self {
            Placement::On(s) => s,
            Placement::DualWrite { from, .. } => from,
            Placement::Reversed { to, .. } => to,
        }
    }
    /// The shard that receives the primary's row images.
    fn secondary(self) -> Option<Shard> {
        match self {
            Placement::On(_) => None,
            Placement::DualWrite { to, .. } => Some(to),
            Placement::Reversed { from, .. } => Some(from),
        }
    }
    fn is_moving(self) -> bool {
        !matches!(self, Placement::On(_))
    }
}

/// Rows of the tenant on a shard, as a set of bits: the data it had before
/// any move, and one bit per write.
const BASE: u8 = 1;
fn row(write: usize) -> u8 {
    2 << write
}

/// The move record's phase (`shard_router_moves.phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    Starting,
    DualWrite,
    Backfilled,
    Verified,
    Reversed,
    Complete,
    Aborted,
}

impl Phase {
    fn finished(self) -> bool {
        matches!(self, Phase::Complete | Phase::Aborted)
    }
}

/// The map change recorded before it is published (`intent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Intent {
    DualWrite,
    Reversed,
    Complete,
    Abort,
}

/// `shard_router_moves`: one row for the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Record {
    from: Shard,
    to: Shard,
    phase: Phase,
    intent: Option<Intent>,
    /// The fencing token: every update presents it.
    token: u8,
    /// Free once released, or once its holder stopped renewing it.
    lease_free: bool,
    /// The mover holding (or last holding) the lease: `lease_holder`.
    holder: u8,
}

/// The control database: maps by version (index + 1) and the move record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Control {
    maps: Vec<Placement>,
    record: Option<Record>,
}

impl Control {
    fn latest_version(&self) -> u8 {
        self.maps.len() as u8
    }
    fn latest(&self) -> Placement {
        *self.maps.last().expect("version 1 always exists")
    }
    fn holds(&self, version: u8, placement: Placement) -> bool {
        version >= 1 && self.maps.get(version as usize - 1) == Some(&placement)
    }
}

/// `shard_router_fence`: writes declaring a version below `min` are refused.
/// `moving = false` marks the shard a tenant left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Fence {
    min: u8,
    moving: bool,
}

/// One shard as the tenant sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ShardState {
    rows: u8,
    fence: Option<Fence>,
    /// The newest mover that claimed the shard: (token, mover).
    claim: Option<(u8, u8)>,
}

impl ShardState {
    fn allows(&self, version: u8) -> bool {
        self.fence.is_none_or(|f| version >= f.min)
    }
}

/// A router: the map version it applied and what that map says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Router {
    version: u8,
    placement: Placement,
    /// Cut off from the control database (or paused): it applies nothing, the
    /// movers stop waiting for it, and it keeps serving what it has.
    cut_off: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Outcome {
    Acknowledged,
    /// The client was told it failed (a fence, or the primary refused at COMMIT).
    Refused,
    /// The client cannot know (one COMMIT of the two was lost).
    Ambiguous,
}

/// One client write through a router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Write {
    Idle,
    /// The request captured its router's map (`TenantDb`), nothing sent yet.
    Began {
        version: u8,
        placement: Placement,
    },
    /// The statement ran on the primary (fence checked), not committed; a
    /// moving write holds the tenant lock on the move's source.
    Open {
        version: u8,
        placement: Placement,
    },
    Done(Outcome),
}

/// What a mover process was started as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Program {
    /// `move start`, `plan --apply` or `--resume`.
    Move,
    /// `--abort`.
    Abort,
}

/// The map change a routing step publishes (`MapChange` in the code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Change {
    DualWrite,
    Reversed,
    PinTarget,
    PinSource,
}

/// A mover's position: the next transition it takes, named as the code's step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pc {
    /// `record::create`: the move record, a new token (`start`, `plan --apply`).
    Create,
    /// `record::acquire`: the lease of a recorded move (`resume`, `abort`).
    Acquire,
    /// `lease::claim_shards`: the token written on both shards.
    ClaimShards,
    /// `resume`: the step to continue from.
    Resume,
    /// `Mover::start`: stale rows of the tenant removed from the target.
    ClearTarget,
    /// `Mover::route`: `record::intent`.
    Intent(Change),
    /// `Mover::route`: `ControlPlane::publish` (skipped if already published).
    Publish(Change),
    /// `Mover::wait_for_routers`.
    WaitForRouters(Change),
    /// `Mover::start`: `fence::raise` on both shards.
    RaiseFences,
    /// `copy::wait_for_writers`.
    WaitForWriters,
    /// `record::phase`.
    Record(Phase),
    /// `Mover::backfill`: `copy::Copy::table`.
    Backfill,
    /// `Mover::verify` (`copy::verify`): under the tenant lock, both write
    /// chains reset (`reset_write_chains`), then every key range compared,
    /// each under the lock. Writes commit between ranges; the model takes the
    /// worst case, every range compared at once here and every later write
    /// landing in a range already compared.
    Verify,
    /// `copy::verify`, `compare_write_chains`: under the tenant lock, both
    /// shards' write chains compared; they differ when a moving write
    /// committed on one side only since the reset.
    VerifyChains,
    /// Without the tenant lock: verify reads the target after the source.
    VerifyTarget,
    /// `Mover::cutover`: verify again before reads switch.
    CutoverVerify,
    /// `Mover::complete`: `fence::raise` on the former shard.
    FenceFormer,
    /// `copy::wait_for_lock_holders`.
    WaitForLockHolders,
    /// `fence::settle`.
    Settle,
    /// `Mover::abort`: the intent `abort`, recorded before anything else.
    AbortBegin,
    /// `Mover::abort`: after cutover, the source checked against the target.
    AbortVerifySource,
    /// `Mover::abort`: the target's rows copied back, then verified.
    AbortRecopy,
    /// `Mover::abort`: `fence::raise` on the target.
    AbortFenceTarget,
    /// `Mover::abort`: `copy::delete_rows` on the target.
    AbortClearTarget,
    /// `Mover::abort`: `fence::settle`.
    AbortSettle,
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Mover {
    program: Program,
    pc: Pc,
    token: u8,
    /// Order in which movers took leases: changes must come in this order.
    order: u8,
    alive: bool,
    /// Its lease was taken from it by a fault (crash or lost connection).
    faulted: bool,
    /// The version its last routing step published or found.
    version: u8,
    /// What a verify without the lock read on the source.
    snapshot: u8,
    /// Whether that verify is cutover's.
    cutover: bool,
    /// The move's shards, read from the record when the lease was taken.
    from: Shard,
    to: Shard,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    control: Control,
    dump: Option<Control>,
    shards: [ShardState; 2],
    routers: [Router; 2],
    writes: Vec<Write>,
    movers: Vec<Mover>,
    /// Budgets left.
    faults: u8,
    router_faults: u8,
    operator: u8,
    /// Bookkeeping for the properties.
    next_order: u8,
    newest_changer: u8,
    interleaved: bool,
    live_mover_displaced: bool,
    verify_passed_unequal: bool,
    /// The shards' write chains (`shard_router_write_chain`) differ: a
    /// moving write committed on one side only since verify reset them.
    chains_differ: bool,
    former: Option<Shard>,
    former_written: bool,
    abort_begun: bool,
    abort_carried_forward: bool,
}

// ---------------------------------------------------------------------------
// The model: bounds and fixes
// ---------------------------------------------------------------------------

/// The known fixes. `Fixes::ALL` is the protocol as built; each bite test
/// turns one off.
#[derive(Clone, Copy, Debug)]
struct Fixes {
    /// Issue 25.1: `resume` continues an abort when the intent says `abort`.
    resume_honours_abort_intent: bool,
    /// Issue 25.4: a live mover keeps its lease whatever it waits for.
    lease_renewed_while_waiting: bool,
    /// Issue 25.4: shard-side steps check the mover's token on the shard.
    shard_steps_check_token: bool,
    /// Issue 26.1: a publish checks the new map against the shards (rows and
    /// fences), not only against the newest stored map: a tenant mid-move by
    /// its fences must be in the map's moves, and when the stored base is
    /// suspect (routers serve maps it does not hold, or a fence is newer than
    /// it) every tenant with rows must be routed to them.
    publish_checks_shards: bool,
    /// Issue 25.2: deferred constraints run on the primary before its row
    /// images reach the other shard.
    constraints_before_images: bool,
    /// Verify takes the tenant lock: no write lands between its two reads.
    verify_under_lock: bool,
    /// Issue 25.7: verify resets a chain of the moving writes on both shards
    /// before its first key range and compares them after its last, so a
    /// COMMIT that landed on one shard only, in a range already compared, is
    /// found.
    verify_compares_write_chains: bool,
    /// Complete raises the former shard's fence to the complete map.
    complete_fences_former: bool,
    /// Found by this model: an abort that finds the dual-write map published
    /// (an earlier abort stopped in its wait) still waits for every router to
    /// apply it before pinning the source; routers may still be on `reversed`.
    abort_waits_for_dual_write: bool,
    /// Found by this model: a mover's publish is refused unless the record's
    /// intent is the change being published (a restore can roll the intent back
    /// under a mover whose token it kept), and an abort is refused once the
    /// newest map pins the tenant to the target.
    publish_matches_intent: bool,
    /// Found by this model: a mover publishes a phase only over the phase
    /// before it, and a wait ends only while the newest map still shows what
    /// it published (a recovery publish after a restore can drop the move);
    /// verify runs only while the newest map dual-writes the tenant (after a
    /// restore, a resumed verify beside routers on the complete map).
    mover_checks_map_entry: bool,
    /// Found by this model: start removes the tenant's rows from the target
    /// only where a fence marks them stale (`moving = false`); rows without a
    /// fence are the tenant's home (a move planned from a restored, older
    /// map), and rows under a moving fence are the move's own (a resumed
    /// start) or, after a restore, again the tenant's home.
    start_keeps_unfenced_rows: bool,
    /// Found by review of the code against this model: a data step (backfill,
    /// the abort's re-copy) runs only while both shards' fences show the move
    /// and the routers serve maps the control database holds; a move record
    /// restored from a backup would copy stale rows over the tenant's home.
    data_steps_check_fences: bool,
}

impl Fixes {
    const ALL: Fixes = Fixes {
        resume_honours_abort_intent: true,
        lease_renewed_while_waiting: true,
        shard_steps_check_token: true,
        publish_checks_shards: true,
        constraints_before_images: true,
        verify_under_lock: true,
        verify_compares_write_chains: true,
        complete_fences_former: true,
        abort_waits_for_dual_write: true,
        publish_matches_intent: true,
        mover_checks_map_entry: true,
        start_keeps_unfenced_rows: true,
        data_steps_check_fences: true,
    };
}

/// How much of each thing may happen in one run.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    writes: usize,
    /// Mover crashes, or a mover's control connection lost (its lease lapses).
    faults: u8,
    /// Routers cut off (and reconnected).
    router_faults: u8,
    /// Operator commands: publish, rollback, abort, resume, plan --apply, restore.
    operator: u8,
    /// Whether a dump of the control database is taken (then restorable).
    restore: bool,
}

struct MoveModel {
    bounds: Bounds,
    fixes: Fixes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Publish,
    Rollback,
    Abort,
    Resume,
    PlanApply,
    Restore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CommitOutcome {
    /// Both COMMITs (or the one) succeed.
    Ok,
    /// The primary refuses at COMMIT (a deferred foreign key, say).
    PrimaryRefuses,
    /// The primary committed, the other side's COMMIT was lost.
    OneSided,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// Mover `m` takes its next step.
    Step(usize),
    /// Mover `m`'s wait ran out (`RoutersBehind`, `WritersInFlight`).
    GiveUp(usize),
    Crash(usize),
    /// Mover `m`'s control connection is lost: its lease lapses while it runs.
    LoseConnection(usize),
    /// The mover did not renew its lease while it waited (the bug).
    LeaseLapsesWhileWaiting(usize),
    /// A dead mover's lease ends.
    LeaseOfDeadMoverEnds,
    Apply(usize),
    CutOff(usize),
    Reconnect(usize),
    Begin(usize, usize),
    Execute(usize),
    Commit(usize, CommitOutcome),
    Dump,
    Operator(Op),
}

fn mover(program: Program, pc: Pc) -> Mover {
    Mover {
        program,
        pc,
        token: 0,
        order: 0,
        alive: true,
        faulted: false,
        version: 0,
        snapshot: 0,
        cutover: false,
        from: Shard::A,
        to: Shard::B,
    }
}

impl MoveModel {
    fn new(bounds: Bounds) -> Self {
        MoveModel {
            bounds,
            fixes: Fixes::ALL,
        }
    }
    fn without(mut self, f: impl FnOnce(&mut Fixes)) -> Self {
        f(&mut self.fixes);
        self
    }
}

/// Rows the tenant's shard must hold: its data and every acknowledged write.
fn required(s: &State) -> u8 {
    s.writes
        .iter()
        .enumerate()
        .filter(|(_, w)| matches!(w, Write::Done(Outcome::Acknowledged)))
        .fold(BASE, |acc, (i, _)| acc | row(i))
}

fn holds_all(s: &State, shard: Shard) -> bool {
    let need = required(s);
    s.shards[shard.i()].rows & need == need
}

/// No write in flight, no mover running, every router on the newest map.
fn quiet(s: &State) -> bool {
    s.writes
        .iter()
        .all(|w| matches!(w, Write::Idle | Write::Done(_)))
        && s.movers.iter().all(|m| !m.alive || m.pc == Pc::Stopped)
        && s.routers.iter().all(|r| {
            !r.cut_off
                && r.version == s.control.latest_version()
                && r.placement == s.control.latest()
        })
}

/// A tenant lock holder: an open write of a moving map.
fn lock_held(s: &State) -> bool {
    s.writes
        .iter()
        .any(|w| matches!(w, Write::Open { placement, .. } if placement.is_moving()))
}

/// Writes on the old map still open (they took no tenant lock).
fn unlocked_writers(s: &State) -> bool {
    s.writes
        .iter()
        .any(|w| matches!(w, Write::Open { placement, .. } if !placement.is_moving()))
}

impl MoveModel {
    fn record(&self, s: &State) -> Record {
        s.control.record.expect("checked at the top of step")
    }

    /// A change by mover `m`: changes must come in the order leases were taken.
    fn changed(&self, s: &mut State, m: usize) {
        let order = s.movers[m].order;
        if order < s.newest_changer {
            s.interleaved = true;
        }
        s.newest_changer = s.newest_changer.max(order);
    }

    /// An update of the move record: only with the record's token (the
    /// `WHERE lease_token = $3` of `record::update`), which also renews the lease.
    fn control_ok(&self, s: &mut State, m: usize) -> bool {
        match s.control.record {
            Some(ref mut r) if r.token == s.movers[m].token && r.holder == m as u8 => {
                r.lease_free = false;
                true
            }
            _ => false,
        }
    }

    /// A shard-side step: refused once a newer mover claimed the shard.
    fn shards_ok(&self, s: &State, m: usize, shards: &[Shard]) -> bool {
        if !self.fixes.shard_steps_check_token {
            return true;
        }
        let me = (s.movers[m].token, m as u8);
        shards
            .iter()
            .all(|sh| s.shards[sh.i()].claim.is_none_or(|c| c == me || c.0 < me.0))
    }

    fn stop(&self, s: &mut State, m: usize, lease_lost: bool) {
        let mv = s.movers[m];
        if lease_lost && !mv.faulted {
            s.live_mover_displaced = true;
        }
        s.movers[m].pc = Pc::Stopped;
        if let Some(ref mut r) = s.control.record {
            if r.token == mv.token && r.holder == m as u8 {
                r.lease_free = true;
            }
        }
    }

    /// The routers a mover waits for: every one it can hear from.
    fn routers_applied(&self, s: &State, version: u8) -> bool {
        s.routers
            .iter()
            .all(|r| r.cut_off || (r.version >= version && s.control.holds(r.version, r.placement)))
    }

    fn placement_of(&self, rec: &Mover, change: Change) -> Placement {
        match change {
            Change::DualWrite => Placement::DualWrite {
                from: rec.from,
                to: rec.to,
            },
            Change::Reversed => Placement::Reversed {
                from: rec.from,
                to: rec.to,
            },
            Change::PinTarget => Placement::On(rec.to),
            Change::PinSource => Placement::On(rec.from),
        }
    }

    /// Where the program goes after the routers applied `change`.
    fn after_route(&self, program: Program, change: Change) -> Pc {
        match (program, change) {
            (Program::Move, Change::DualWrite) => Pc::RaiseFences,
            (Program::Move, Change::Reversed) => Pc::Record(Phase::Reversed),
            (Program::Move, Change::PinTarget) => {
                if self.fixes.complete_fences_former {
                    Pc::FenceFormer
                } else {
                    Pc::Settle
                }
            }
            (Program::Abort, Change::DualWrite) => Pc::Intent(Change::PinSource),
            (Program::Abort, _) => Pc::AbortFenceTarget,
            (Program::Move, Change::PinSource) => unreachable!("only aborts pin the source"),
        }
    }

    /// Where `resume` continues a recorded move.
    fn resume_at(&self, rec: &Record) -> Pc {
        if self.fixes.resume_honours_abort_intent && rec.intent == Some(Intent::Abort) {
            return Pc::AbortBegin;
        }
        match rec.phase {
            Phase::Starting => Pc::ClearTarget,
            Phase::DualWrite => Pc::Backfill,
            Phase::Backfilled => Pc::Verify,
            Phase::Verified => Pc::CutoverVerify,
            Phase::Reversed => Pc::Intent(Change::PinTarget),
            Phase::Complete | Phase::Aborted => Pc::Stopped,
        }
    }

    /// The publish check every operator publish and rollback runs. `true`: refused.
    fn publish_refused(&self, s: &State, new: Placement, version: u8) -> bool {
        let latest = s.control.latest();
        // Routers ahead: a version at or below a connected router's.
        if s.routers.iter().any(|r| !r.cut_off && r.version >= version) {
            return true;
        }
        // Only the mover edits a move's entry: none dropped, changed or brought back.
        if latest.is_moving() || new.is_moving() {
            return true;
        }
        // The check against the newest stored map: a tenant whose shard
        // changes, with data on its old shard.
        let rehomed = latest.reads() != new.reads() && s.shards[latest.reads().i()].rows != 0;
        if !self.fixes.publish_checks_shards {
            return rehomed;
        }
        // The shards say where the tenant is. A fence still moving means a
        // move the new map must show.
        if s.shards.iter().any(|sh| sh.fence.is_some_and(|f| f.moving)) {
            return true;
        }
        // A stored base that is not what the routers serve (a router ahead of
        // it), or older than a fence, is suspect: then every tenant with rows
        // is checked against the new map, rows on a shard its fence marks as
        // left (`moving = false`) not counting.
        let latest_version = s.control.latest_version();
        let suspect = s
            .routers
            .iter()
            .any(|r| !r.cut_off && !s.control.holds(r.version, r.placement))
            || s.shards
                .iter()
                .any(|sh| sh.fence.is_some_and(|f| f.min > latest_version));
        if !suspect {
            return rehomed;
        }
        let home = [Shard::A, Shard::B].into_iter().find(|sh| {
            let st = &s.shards[sh.i()];
            st.rows != 0 && st.fence.is_none_or(|f| f.moving)
        });
        rehomed || home.is_some_and(|h| h != new.reads())
    }

    fn operator_publish(&self, s: &mut State, new: Placement) {
        let version = s
            .routers
            .iter()
            .filter(|r| !r.cut_off)
            .map(|r| r.version)
            .chain([s.control.latest_version()])
            .max()
            .unwrap()
            + 1;
        if self.publish_refused(s, new, version) {
            return;
        }
        while s.control.latest_version() + 1 < version {
            // Versions skipped to get above the routers: the same map.
            let latest = s.control.latest();
            s.control.maps.push(latest);
        }
        s.control.maps.push(new);
    }

    /// Mover `m`'s next step. `None`: the step cannot be taken now.
    fn step(&self, s: &mut State, m: usize) -> Option<()> {
        let mv = s.movers[m];
        if !matches!(mv.pc, Pc::Create | Pc::Acquire) && s.control.record.is_none() {
            // NoMove: the record is gone (a restored control database).
            return self.refuse(s, m);
        }
        let rec = mv;
        match mv.pc {
            Pc::Create => {
                let latest = s.control.latest();
                let from = match latest {
                    Placement::On(sh) => sh,
                    _ => return self.refuse(s, m),
                };
                if s.control.record.is_some_and(|r| !r.phase.finished()) {
                    return self.refuse(s, m);
                }
                let token = s.control.record.map_or(0, |r| r.token).max(self.claimed(s)) + 1;
                s.control.record = Some(Record {
                    from,
                    to: from.other(),
                    phase: Phase::Starting,
                    intent: None,
                    token,
                    lease_free: false,
                    holder: m as u8,
                });
                s.former = None;
                s.abort_begun = false;
                (s.movers[m].from, s.movers[m].to) = (from, from.other());
                self.took_lease(s, m, token);
            }
            Pc::Acquire => {
                let Some(rec) = s.control.record else {
                    return self.refuse(s, m);
                };
                if rec.phase.finished()
                    || (mv.program == Program::Abort && rec.intent == Some(Intent::Complete))
                {
                    return self.refuse(s, m);
                }
                if !rec.lease_free {
                    // LeaseHeld: the command says so and exits.
                    return self.refuse(s, m);
                }
                let token = rec.token.max(self.claimed(s)) + 1;
                let r = s.control.record.as_mut().unwrap();
                r.token = token;
                r.lease_free = false;
                r.holder = m as u8;
                (s.movers[m].from, s.movers[m].to) = (rec.from, rec.to);
                self.took_lease(s, m, token);
            }
            Pc::ClaimShards => {
                if self.fixes.shard_steps_check_token {
                    if !self.shards_ok(s, m, &[Shard::A, Shard::B]) {
                        // MoveError::ClaimedByOther: a mover with this token or a
                        // newer one claimed the shards (a restored control database).
                        return self.refuse(s, m);
                    }
                    for sh in &mut s.shards {
                        sh.claim = Some((mv.token, m as u8));
                    }
                }
                s.movers[m].pc = match mv.program {
                    Program::Abort => Pc::AbortBegin,
                    Program::Move
                        if self.record(s).phase == Phase::Starting
                            && self.record(s).intent.is_none() =>
                    {
                        Pc::ClearTarget
                    }
                    Program::Move => Pc::Resume,
                };
            }
            Pc::Resume => {
                let recorded = self.record(s);
                s.movers[m].pc = self.resume_at(&recorded);
                if s.movers[m].pc == Pc::AbortBegin {
                    s.movers[m].program = Program::Abort;
                }
                if s.movers[m].pc == Pc::Stopped {
                    self.stop(s, m, false);
                }
            }
            Pc::ClearTarget => {
                if lock_held(s) {
                    return None;
                }
                if !self.shards_ok(s, m, &[rec.from, rec.to]) {
                    return self.lease_lost(s, m);
                }
                let target = s.shards[rec.to.i()];
                match target.fence {
                    _ if !self.fixes.start_keeps_unfenced_rows => s.shards[rec.to.i()].rows = 0,
                    // Rows and no fence: the tenant's home, not stale rows.
                    // MoveError::TargetHoldsTenant: nothing is deleted.
                    None if target.rows != 0 => return self.refuse(s, m),
                    None => {}
                    // Left by an earlier move or abort: stale, removed.
                    Some(Fence { moving: false, .. }) => s.shards[rec.to.i()].rows = 0,
                    // Fenced for a move in flight: this move's own row images
                    // (a resumed start), or after a restore the tenant's home.
                    Some(Fence { moving: true, .. }) => {}
                }
                // The target is marked moving before any row image can reach
                // it, so an abort knows which rows are the move's.
                if self.fixes.start_keeps_unfenced_rows {
                    let version = s.control.latest_version();
                    raise(&mut s.shards[rec.to.i()], version);
                }
                self.changed(s, m);
                s.movers[m].pc = Pc::Intent(Change::DualWrite);
            }
            Pc::Intent(change) => {
                if !self.control_ok(s, m) {
                    return self.lease_lost(s, m);
                }
                let intent = match change {
                    Change::DualWrite => Intent::DualWrite,
                    Change::Reversed => Intent::Reversed,
                    Change::PinTarget => Intent::Complete,
                    Change::PinSource => Intent::Abort,
                };
                let r = s.control.record.as_mut().unwrap();
                // An abort keeps its intent `abort` through all its publishes.
                if !(mv.program == Program::Abort && r.intent == Some(Intent::Abort)) {
                    r.intent = Some(intent);
                }
                self.changed(s, m);
                s.movers[m].pc = Pc::Publish(change);
            }
            Pc::Publish(change) => {
                let want = self.placement_of(&rec, change);
                if !self.control_ok(s, m) {
                    return self.lease_lost(s, m);
                }
                let intended = match (mv.program, change) {
                    (Program::Abort, _) => Intent::Abort,
                    (_, Change::DualWrite) => Intent::DualWrite,
                    (_, Change::Reversed) => Intent::Reversed,
                    (_, Change::PinTarget) => Intent::Complete,
                    (_, Change::PinSource) => Intent::Abort,
                };
                if self.fixes.publish_matches_intent && self.record(s).intent != Some(intended) {
                    // PublishError::IntentChanged: the move stops.
                    return self.refuse(s, m);
                }
                if s.abort_begun && matches!(change, Change::Reversed | Change::PinTarget) {
                    s.abort_carried_forward = true;
                }
                let latest = s.control.latest();
                let (from, to) = (mv.from, mv.to);
                let follows = match change {
                    Change::DualWrite => {
                        matches!(latest, Placement::On(sh) if sh == from) || latest.is_moving()
                    }
                    Change::Reversed => latest == Placement::DualWrite { from, to },
                    Change::PinTarget => latest == Placement::Reversed { from, to },
                    Change::PinSource => latest == Placement::DualWrite { from, to },
                };
                if self.fixes.mover_checks_map_entry && latest != want && !follows {
                    // MoveError::MapChanged: the move stops; abort it.
                    return self.refuse(s, m);
                }
                let version = if s.control.latest() == want {
                    s.control.latest_version()
                } else {
                    let version = s.control.latest_version() + 1;
                    if s.routers.iter().any(|r| !r.cut_off && r.version >= version) {
                        // PublishError::RoutersAhead: the move stops.
                        return self.refuse(s, m);
                    }
                    s.control.maps.push(want);
                    self.changed(s, m);
                    version
                };
                s.movers[m].version = version;
                s.movers[m].pc = Pc::WaitForRouters(change);
            }
            Pc::WaitForRouters(change) => {
                if self.fixes.mover_checks_map_entry
                    && s.control.latest() != self.placement_of(&mv, change)
                {
                    return self.refuse(s, m);
                }
                if !self.routers_applied(s, mv.version) {
                    return None;
                }
                if !self.control_ok(s, m) {
                    return self.lease_lost(s, m);
                }
                s.movers[m].pc = self.after_route(mv.program, change);
            }
            Pc::RaiseFences => {
                if !self.shards_ok(s, m, &[rec.from, rec.to]) {
                    return self.lease_lost(s, m);
                }
                for sh in [rec.from, rec.to] {
                    raise(&mut s.shards[sh.i()], mv.version);
                }
                self.changed(s, m);
                s.movers[m].pc = Pc::WaitForWriters;
            }
            Pc::WaitForWriters => {
                if unlocked_writers(s) {
                    return None;
                }
                s.movers[m].pc = Pc::Record(Phase::DualWrite);
            }
            Pc::Record(phase) => {
                if !self.control_ok(s, m) {
                    return self.lease_lost(s, m);
                }
                if s.abort_begun && matches!(phase, Phase::Reversed | Phase::Complete) {
                    s.abort_carried_forward = true;
                }
                s.control.record.as_mut().unwrap().phase = phase;
                if phase == Phase::Complete {
                    s.former = Some(mv.from);
                }
                self.changed(s, m);
                s.movers[m].pc = match phase {
                    Phase::DualWrite => Pc::Backfill,
                    Phase::Backfilled => Pc::Verify,
                    Phase::Verified => Pc::CutoverVerify,
                    Phase::Reversed => Pc::Intent(Change::PinTarget),
                    Phase::Complete | Phase::Aborted | Phase::Starting => Pc::Stopped,
                };
                if s.movers[m].pc == Pc::Stopped {
                    self.stop(s, m, false);
                }
            }
            Pc::Backfill => {
                if lock_held(s) {
                    return None;
                }
                if !self.shards_ok(s, m, &[rec.from, rec.to]) {
                    return self.lease_lost(s, m);
                }
                if !self.in_flight(s, &rec) {
                    // ControlBehind / FenceDisagrees: nothing is copied.
                    return self.refuse(s, m);
                }
                // Batch by batch the target's range is replaced by the source's.
                s.shards[rec.to.i()].rows = s.shards[rec.from.i()].rows;
                self.changed(s, m);
                s.movers[m].pc = Pc::Record(Phase::Backfilled);
            }
            Pc::Verify | Pc::CutoverVerify => {
                if self.fixes.verify_under_lock {
                    if lock_held(s) {
                        return None;
                    }
                    if self.fixes.verify_compares_write_chains {
                        // The reset is a shard-side write: only with the claim.
                        if !self.shards_ok(s, m, &[rec.from, rec.to]) {
                            return self.lease_lost(s, m);
                        }
                        // `check_in_flight`, as before every data step: the
                        // chains see moving writes only, and only the fences
                        // and maps of a move in flight keep other writes out
                        // while the ranges are compared.
                        if !self.in_flight(s, &rec) {
                            return self.refuse(s, m);
                        }
                        s.chains_differ = false;
                    }
                    // `Mover::verify`: only while the newest map dual-writes
                    // the tenant (MapChanged otherwise): the chains see
                    // moving writes only.
                    // Cutover's also over `reversed`: a cutover stopped in
                    // its wait for the routers published it already.
                    let latest = s.control.latest();
                    let dual_write = Placement::DualWrite {
                        from: rec.from,
                        to: rec.to,
                    };
                    let reversed = Placement::Reversed {
                        from: rec.from,
                        to: rec.to,
                    };
                    let follows =
                        latest == dual_write || (mv.pc == Pc::CutoverVerify && latest == reversed);
                    if self.fixes.mover_checks_map_entry && !follows {
                        return self.refuse(s, m);
                    }
                    let (src, dst) = (s.shards[rec.from.i()].rows, s.shards[rec.to.i()].rows);
                    if src != dst {
                        // VerifyFailed: the move stops where it was.
                        return self.refuse(s, m);
                    }
                    s.movers[m].cutover = mv.pc == Pc::CutoverVerify;
                    s.movers[m].pc = Pc::VerifyChains;
                } else {
                    s.movers[m].snapshot = s.shards[rec.from.i()].rows;
                    s.movers[m].cutover = mv.pc == Pc::CutoverVerify;
                    s.movers[m].pc = Pc::VerifyTarget;
                }
            }
            Pc::VerifyChains => {
                if lock_held(s) {
                    return None;
                }
                let next = if mv.cutover {
                    Pc::Intent(Change::Reversed)
                } else {
                    Pc::Record(Phase::Verified)
                };
                // Read under the claim, as the reset was.
                if self.fixes.verify_compares_write_chains
                    && !self.shards_ok(s, m, &[rec.from, rec.to])
                {
                    return self.lease_lost(s, m);
                }
                // Without the chains every range compared already passed.
                let equal = !(self.fixes.verify_compares_write_chains && s.chains_differ);
                self.verified(s, m, equal, next);
            }
            Pc::VerifyTarget => {
                let next = if mv.cutover {
                    Pc::Intent(Change::Reversed)
                } else {
                    Pc::Record(Phase::Verified)
                };
                let equal = mv.snapshot == s.shards[rec.to.i()].rows;
                self.verified(s, m, equal, next);
            }
            Pc::FenceFormer => {
                if !self.shards_ok(s, m, &[rec.from]) {
                    return self.lease_lost(s, m);
                }
                raise(&mut s.shards[rec.from.i()], mv.version);
                self.changed(s, m);
                s.movers[m].pc = Pc::WaitForLockHolders;
            }
            Pc::WaitForLockHolders => {
                if lock_held(s) {
                    return None;
                }
                s.movers[m].pc = Pc::Settle;
            }
            Pc::Settle | Pc::AbortSettle => {
                let (owner, former) = if mv.pc == Pc::Settle {
                    (rec.to, rec.from)
                } else {
                    (rec.from, rec.to)
                };
                if !self.shards_ok(s, m, &[owner, former]) {
                    return self.lease_lost(s, m);
                }
                s.shards[owner.i()].fence = None;
                if let Some(f) = s.shards[former.i()].fence.as_mut() {
                    f.moving = false;
                }
                self.changed(s, m);
                s.movers[m].pc = if mv.pc == Pc::Settle {
                    Pc::Record(Phase::Complete)
                } else {
                    Pc::Record(Phase::Aborted)
                };
            }
            Pc::AbortBegin => {
                if !self.control_ok(s, m) {
                    return self.lease_lost(s, m);
                }
                let r = self.record(s);
                if r.intent == Some(Intent::Complete) || r.phase.finished() {
                    return self.refuse(s, m);
                }
                if self.fixes.publish_matches_intent && s.control.latest() == Placement::On(mv.to) {
                    // Finished: the complete map is out; resume finishes it.
                    return self.refuse(s, m);
                }
                let r = s.control.record.as_mut().unwrap();
                r.intent = Some(Intent::Abort);
                s.abort_begun = true;
                self.changed(s, m);
                s.movers[m].pc = match s.control.latest() {
                    Placement::Reversed { .. } => Pc::AbortVerifySource,
                    Placement::DualWrite { .. } if self.fixes.abort_waits_for_dual_write => {
                        Pc::Intent(Change::DualWrite)
                    }
                    _ => Pc::Intent(Change::PinSource),
                };
            }
            Pc::AbortVerifySource => {
                if lock_held(s) {
                    return None;
                }
                let equal = s.shards[rec.from.i()].rows == s.shards[rec.to.i()].rows;
                s.movers[m].pc = if equal {
                    Pc::Intent(Change::DualWrite)
                } else {
                    Pc::AbortRecopy
                };
            }
            Pc::AbortRecopy => {
                if lock_held(s) {
                    return None;
                }
                if !self.shards_ok(s, m, &[rec.from, rec.to]) {
                    return self.lease_lost(s, m);
                }
                if !self.in_flight(s, &rec) {
                    return self.refuse(s, m);
                }
                s.shards[rec.from.i()].rows = s.shards[rec.to.i()].rows;
                self.changed(s, m);
                let equal = s.shards[rec.from.i()].rows == s.shards[rec.to.i()].rows;
                if !equal {
                    // VerifyFailed: the source holds rows the target lacks.
                    return self.refuse(s, m);
                }
                s.movers[m].pc = Pc::Intent(Change::DualWrite);
            }
            Pc::AbortFenceTarget => {
                if !self.shards_ok(s, m, &[rec.to]) {
                    return self.lease_lost(s, m);
                }
                if s.shards[rec.to.i()].fence.is_some_and(|f| f.moving) {
                    raise(&mut s.shards[rec.to.i()], mv.version);
                    self.changed(s, m);
                }
                s.movers[m].pc = Pc::AbortClearTarget;
            }
            Pc::AbortClearTarget => {
                if lock_held(s) {
                    return None;
                }
                if !self.shards_ok(s, m, &[rec.from, rec.to]) {
                    return self.lease_lost(s, m);
                }
                // Rows on a target without a fence were never the move's (its
                // start refused them): they stay.
                if !self.fixes.start_keeps_unfenced_rows || s.shards[rec.to.i()].fence.is_some() {
                    s.shards[rec.to.i()].rows = 0;
                }
                self.changed(s, m);
                s.movers[m].pc = Pc::AbortSettle;
            }
            Pc::Stopped => return None,
        }
        Some(())
    }

    /// The check before a data step: both fences show the move, and no
    /// connected router serves a map the control database does not hold.
    fn in_flight(&self, s: &State, rec: &Mover) -> bool {
        if !self.fixes.data_steps_check_fences {
            return true;
        }
        let fenced = [rec.from, rec.to]
            .iter()
            .all(|sh| s.shards[sh.i()].fence.is_some_and(|f| f.moving));
        let behind = s
            .routers
            .iter()
            .any(|r| !r.cut_off && !s.control.holds(r.version, r.placement));
        fenced && !behind
    }

    /// The highest token claimed on the shards (`claim::highest`): a new
    /// token goes above it, whatever a restored record says.
    fn claimed(&self, s: &State) -> u8 {
        s.shards
            .iter()
            .filter_map(|sh| sh.claim.map(|c| c.0))
            .max()
            .unwrap_or(0)
    }

    fn took_lease(&self, s: &mut State, m: usize, token: u8) {
        s.movers[m].token = token;
        s.movers[m].order = s.next_order;
        s.next_order += 1;
        s.movers[m].pc = Pc::ClaimShards;
    }

    fn verified(&self, s: &mut State, m: usize, equal: bool, next: Pc) {
        let rec = s.movers[m];
        let really_equal = s.shards[rec.from.i()].rows == s.shards[rec.to.i()].rows;
        if equal {
            if !really_equal {
                s.verify_passed_unequal = true;
            }
            s.movers[m].pc = next;
        } else {
            // VerifyFailed: the move stops where it was.
            self.refuse(s, m);
        }
    }

    fn refuse(&self, s: &mut State, m: usize) -> Option<()> {
        self.stop(s, m, false);
        Some(())
    }

    fn lease_lost(&self, s: &mut State, m: usize) -> Option<()> {
        self.stop(s, m, true);
        Some(())
    }
}

fn raise(shard: &mut ShardState, version: u8) {
    let min = shard.fence.map_or(version, |f| f.min.max(version));
    shard.fence = Some(Fence { min, moving: true });
}

fn is_wait(pc: Pc) -> bool {
    matches!(
        pc,
        Pc::WaitForRouters(_) | Pc::WaitForWriters | Pc::WaitForLockHolders
    )
}

impl Model for MoveModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let start = Placement::On(Shard::A);
        let empty = ShardState {
            rows: 0,
            fence: None,
            claim: None,
        };
        let router = Router {
            version: 1,
            placement: start,
            cut_off: false,
        };
        vec![State {
            control: Control {
                maps: vec![start],
                record: None,
            },
            dump: None,
            shards: [
                ShardState {
                    rows: BASE,
                    ..empty
                },
                empty,
            ],
            routers: [router; 2],
            writes: vec![Write::Idle; self.bounds.writes],
            movers: vec![mover(Program::Move, Pc::Create)],
            faults: self.bounds.faults,
            router_faults: self.bounds.router_faults,
            operator: self.bounds.operator,
            next_order: 1,
            newest_changer: 0,
            interleaved: false,
            live_mover_displaced: false,
            verify_passed_unequal: false,
            chains_differ: false,
            former: None,
            former_written: false,
            abort_begun: false,
            abort_carried_forward: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (m, mv) in s.movers.iter().enumerate() {
            if !mv.alive || mv.pc == Pc::Stopped {
                continue;
            }
            actions.push(Action::Step(m));
            if is_wait(mv.pc) {
                actions.push(Action::GiveUp(m));
            }
            if s.faults > 0 {
                actions.push(Action::Crash(m));
            }
            let holds = s
                .control
                .record
                .is_some_and(|r| r.token == mv.token && r.holder == m as u8 && !r.lease_free);
            if holds && s.faults > 0 {
                actions.push(Action::LoseConnection(m));
            }
            if holds && is_wait(mv.pc) && !self.fixes.lease_renewed_while_waiting {
                actions.push(Action::LeaseLapsesWhileWaiting(m));
            }
        }
        if let Some(r) = s.control.record {
            let holder_dead = s.movers.get(r.holder as usize).is_some_and(|mv| !mv.alive);
            if !r.lease_free && holder_dead {
                actions.push(Action::LeaseOfDeadMoverEnds);
            }
        }
        for (i, r) in s.routers.iter().enumerate() {
            if r.cut_off {
                actions.push(Action::Reconnect(i));
            } else {
                if s.control.latest_version() > r.version {
                    actions.push(Action::Apply(i));
                }
                if s.router_faults > 0 {
                    actions.push(Action::CutOff(i));
                }
            }
        }
        for (w, write) in s.writes.iter().enumerate() {
            match write {
                Write::Idle => {
                    // Writes go one after another in index order, which keeps
                    // the state space small without losing an interleaving of
                    // the protocol (the writes are alike).
                    if w == 0 || !matches!(s.writes[w - 1], Write::Idle) {
                        for r in 0..s.routers.len() {
                            if r == 0
                                || (s.routers[r].version, s.routers[r].placement)
                                    != (s.routers[0].version, s.routers[0].placement)
                            {
                                actions.push(Action::Begin(w, r));
                            }
                        }
                    }
                }
                Write::Began { .. } => actions.push(Action::Execute(w)),
                Write::Open { placement, .. } => {
                    actions.push(Action::Commit(w, CommitOutcome::Ok));
                    actions.push(Action::Commit(w, CommitOutcome::PrimaryRefuses));
                    if placement.is_moving() {
                        actions.push(Action::Commit(w, CommitOutcome::OneSided));
                    }
                }
                Write::Done(_) => {}
            }
        }
        if self.bounds.restore && s.dump.is_none() {
            actions.push(Action::Dump);
        }
        if s.operator > 0 {
            let unfinished = s.control.record.is_some_and(|r| !r.phase.finished());
            actions.push(Action::Operator(Op::Publish));
            if s.control.maps.len() >= 2 {
                actions.push(Action::Operator(Op::Rollback));
            }
            if unfinished {
                actions.push(Action::Operator(Op::Abort));
                actions.push(Action::Operator(Op::Resume));
            } else {
                actions.push(Action::Operator(Op::PlanApply));
            }
            if s.dump.is_some() {
                actions.push(Action::Operator(Op::Restore));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Step(m) => self.step(&mut s, m)?,
            Action::GiveUp(m) => self.stop(&mut s, m, false),
            Action::Crash(m) => {
                s.faults -= 1;
                s.movers[m].alive = false;
                s.movers[m].faulted = true;
            }
            Action::LoseConnection(m) => {
                s.faults -= 1;
                s.movers[m].faulted = true;
                s.control.record.as_mut()?.lease_free = true;
            }
            Action::LeaseLapsesWhileWaiting(_) | Action::LeaseOfDeadMoverEnds => {
                s.control.record.as_mut()?.lease_free = true;
            }
            Action::Apply(i) => {
                s.routers[i].version = s.control.latest_version();
                s.routers[i].placement = s.control.latest();
            }
            Action::CutOff(i) => {
                s.router_faults -= 1;
                s.routers[i].cut_off = true;
            }
            Action::Reconnect(i) => {
                let r = &mut s.routers[i];
                r.cut_off = false;
                // Never back to a lower version (a restored control database).
                if s.control.latest_version() > r.version {
                    r.version = s.control.latest_version();
                    r.placement = s.control.latest();
                }
            }
            Action::Begin(w, r) => {
                let router = s.routers[r];
                s.writes[w] = Write::Began {
                    version: router.version,
                    placement: router.placement,
                };
            }
            Action::Execute(w) => {
                let Write::Began { version, placement } = s.writes[w] else {
                    return None;
                };
                if placement.is_moving() && lock_held(&s) {
                    return None;
                }
                s.writes[w] = if s.shards[placement.reads().i()].allows(version) {
                    Write::Open { version, placement }
                } else {
                    Write::Done(Outcome::Refused)
                };
            }
            Action::Commit(w, outcome) => {
                let Write::Open { version, placement } = s.writes[w] else {
                    return None;
                };
                let primary = placement.reads();
                let mut wrote = [false; 2];
                s.writes[w] = match (placement.secondary(), outcome) {
                    (None, CommitOutcome::Ok) => {
                        wrote[primary.i()] = true;
                        Write::Done(Outcome::Acknowledged)
                    }
                    (None, _) => Write::Done(Outcome::Refused),
                    (Some(other), _) if !s.shards[other.i()].allows(version) => {
                        // The row images are refused by the other shard's fence:
                        // the writer rolls both sides back.
                        Write::Done(Outcome::Refused)
                    }
                    (Some(other), CommitOutcome::Ok) => {
                        wrote[primary.i()] = true;
                        wrote[other.i()] = true;
                        Write::Done(Outcome::Acknowledged)
                    }
                    (Some(other), CommitOutcome::PrimaryRefuses) => {
                        if !self.fixes.constraints_before_images {
                            wrote[other.i()] = true;
                        }
                        Write::Done(Outcome::Refused)
                    }
                    (Some(_), CommitOutcome::OneSided) => {
                        wrote[primary.i()] = true;
                        Write::Done(Outcome::Ambiguous)
                    }
                };
                if placement.is_moving() && wrote[0] != wrote[1] {
                    s.chains_differ = true;
                }
                for sh in [Shard::A, Shard::B] {
                    if wrote[sh.i()] {
                        s.shards[sh.i()].rows |= row(w);
                        if s.former == Some(sh) {
                            s.former_written = true;
                        }
                    }
                }
            }
            Action::Dump => s.dump = Some(s.control.clone()),
            Action::Operator(op) => {
                s.operator -= 1;
                match op {
                    Op::Publish => self.operator_publish(&mut s, Placement::On(Shard::A)),
                    Op::Rollback => {
                        let previous = s.control.maps[s.control.maps.len() - 2];
                        self.operator_publish(&mut s, previous);
                    }
                    Op::Abort => s.movers.push(mover(Program::Abort, Pc::Acquire)),
                    Op::Resume => s.movers.push(mover(Program::Move, Pc::Acquire)),
                    Op::PlanApply => s.movers.push(mover(Program::Move, Pc::Create)),
                    Op::Restore => {
                        s.control = s.dump.clone()?;
                        // Movers fenced out by a restore lose their lease by design.
                        for mv in &mut s.movers {
                            mv.faulted = true;
                        }
                    }
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "every acknowledged write is readable once quiet",
                |_, s: &State| !quiet(s) || holds_all(s, s.control.latest().reads()),
            ),
            Property::always(
                "no tenant with data is routed to a shard that lacks it",
                |_, s: &State| {
                    let newest_served = s
                        .routers
                        .iter()
                        .all(|r| r.version <= s.control.latest_version());
                    (!newest_served || holds_all(s, s.control.latest().reads()))
                        && s.routers
                            .iter()
                            .filter(|r| !r.cut_off)
                            .all(|r| holds_all(s, r.placement.reads()))
                },
            ),
            Property::always(
                "at most one mover changes the move at a time",
                |_, s: &State| !s.interleaved,
            ),
            Property::always("a live mover keeps its lease", |_, s: &State| {
                !s.live_mover_displaced
            }),
            Property::always(
                "verify passes only if the copies are equal",
                |_, s: &State| !s.verify_passed_unequal,
            ),
            Property::always(
                "after complete no router writes the former shard",
                |_, s: &State| !s.former_written,
            ),
            Property::always("an abort once begun ends as an abort", |_, s: &State| {
                !s.abort_carried_forward
            }),
            Property::always(
                "a write the source refused exists nowhere",
                |_, s: &State| {
                    s.writes.iter().enumerate().all(|(i, w)| {
                        !matches!(w, Write::Done(Outcome::Refused))
                            || s.shards.iter().all(|sh| sh.rows & row(i) == 0)
                    })
                },
            ),
            // Not a safety property: shows the model reaches the end of a move.
            Property::sometimes("a move completes", |_, s: &State| {
                s.control.record.is_some_and(|r| r.phase == Phase::Complete)
            }),
            Property::sometimes("an abort completes", |_, s: &State| {
                s.control.record.is_some_and(|r| r.phase == Phase::Aborted)
            }),
        ]
    }
}

// ---------------------------------------------------------------------------
// Running the checker
// ---------------------------------------------------------------------------

/// Checks `model` breadth first, prints what it explored, and returns the checker.
fn check(name: &str, model: MoveModel, until: Option<&'static str>) -> impl Checker<MoveModel> {
    let bounds = model.bounds;
    let started = Instant::now();
    let mut builder = model.checker();
    if let Some(property) = until {
        // Stop at the first violation: breadth first, so its trace is short.
        builder = builder.finish_when(HasDiscoveries::AnyOf([property].into()));
    }
    let checker = builder.spawn_bfs().join();
    println!(
        "{name}: {bounds:?}: {} states ({} unique), depth {}, {} in {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        if checker.is_done() {
            "exhausted"
        } else {
            "NOT exhausted"
        },
        started.elapsed().as_secs_f64()
    );
    checker
}

const SAFETY: [&str; 8] = [
    "every acknowledged write is readable once quiet",
    "no tenant with data is routed to a shard that lacks it",
    "at most one mover changes the move at a time",
    "a live mover keeps its lease",
    "verify passes only if the copies are equal",
    "after complete no router writes the former shard",
    "an abort once begun ends as an abort",
    "a write the source refused exists nowhere",
];

fn assert_safe(checker: &impl Checker<MoveModel>) {
    assert!(checker.is_done(), "the space was not exhausted");
    for name in SAFETY {
        if let Some(path) = checker.discovery(name) {
            panic!("{name}: violated by\n{}", trace(path));
        }
    }
    for name in ["a move completes", "an abort completes"] {
        assert!(
            checker.discovery(name).is_some(),
            "{name}: never reached, the model is too tight"
        );
    }
}

/// A trace as numbered steps, each mover step named as the code's.
fn trace(path: stateright::Path<State, Action>) -> String {
    let mut out = String::new();
    for (i, (state, action)) in path.into_vec().into_iter().enumerate() {
        match action {
            Some(Action::Step(m)) => {
                let mv = state.movers[m];
                out.push_str(&format!("{i:>3}. mover {m} ({:?}): {:?}\n", mv.program, mv.pc));
            }
            Some(a) => out.push_str(&format!("{i:>3}. {a:?}\n")),
            None => out.push_str(&format!(
                "     end: maps {:?}\n          record {:?}\n          shards {:?}\n          routers {:?}\n          writes {:?}\n",
                state.control.maps, state.control.record, state.shards, state.routers, state.writes
            )),
        }
    }
    out
}

/// Shows that the model bites: without `fix`, `property` is violated, and the
/// trace is printed.
fn bites(name: &str, bounds: Bounds, property: &str, fix: impl FnOnce(&mut Fixes)) {
    let property = SAFETY
        .into_iter()
        .find(|p| *p == property)
        .expect("a property");
    let model = MoveModel::new(bounds).without(fix);
    let checker = check(name, model, Some(property));
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{name}: the checker did not find a violation of {property:?}"));
    println!("{name}: {property:?} violated by\n{}", trace(path));
}

/// A bound: writes, mover faults, router faults, operator commands, restore.
const fn bound(
    writes: usize,
    faults: u8,
    router_faults: u8,
    operator: u8,
    restore: bool,
) -> Bounds {
    Bounds {
        writes,
        faults,
        router_faults,
        operator,
        restore,
    }
}

/// The bound the issue names: 2 shards, 2 routers, 1 tenant, 2 writes, 1 crash
/// (or lost control connection), 1 router cut off, 1 operator command.
const ISSUE_BOUND: Bounds = Bounds {
    writes: 2,
    faults: 1,
    router_faults: 1,
    operator: 1,
    restore: false,
};

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "millions of states: run with --release (.ci/run does)"
)]
fn the_protocol_holds_in_the_issue_bound() {
    assert_safe(&check("issue bound", MoveModel::new(ISSUE_BOUND), None));
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "millions of states: run with --release (.ci/run does)"
)]
fn the_protocol_holds_with_two_operator_commands() {
    let bounds = Bounds {
        writes: 1,
        operator: 2,
        ..ISSUE_BOUND
    };
    assert_safe(&check("two commands", MoveModel::new(bounds), None));
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "millions of states: run with --release (.ci/run does)"
)]
fn the_protocol_holds_across_a_restore_and_the_documented_recovery() {
    let bounds = bound(1, 0, 0, 2, true);
    assert_safe(&check("restore", MoveModel::new(bounds), None));
}

// --- The bite tests: each removes one fix and finds its violation. ----------

#[test]
fn bite_a_resume_that_ignores_the_abort_intent() {
    let bounds = bound(1, 0, 0, 2, false);
    bites(
        "resume ignores intent",
        bounds,
        "an abort once begun ends as an abort",
        |f| f.resume_honours_abort_intent = false,
    );
}

#[test]
fn bite_a_resumed_abort_loses_an_acknowledged_write() {
    let bounds = bound(1, 0, 0, 2, false);
    // Two fixes stand in the way of this loss: the resume that follows the
    // intent, and the mover that publishes `reversed` only over `dual_write`.
    bites(
        "resume ignores intent, writers",
        bounds,
        "every acknowledged write is readable once quiet",
        |f| {
            f.resume_honours_abort_intent = false;
            f.mover_checks_map_entry = false;
        },
    );
}

#[test]
fn bite_a_lease_not_renewed_during_a_wait() {
    let bounds = bound(0, 0, 0, 1, false);
    bites(
        "lease lapses in a wait",
        bounds,
        "a live mover keeps its lease",
        |f| f.lease_renewed_while_waiting = false,
    );
}

#[test]
fn bite_shard_steps_that_ignore_the_token() {
    let bounds = bound(0, 1, 0, 1, false);
    bites(
        "no token on shards",
        bounds,
        "at most one mover changes the move at a time",
        |f| f.shard_steps_check_token = false,
    );
}

#[test]
fn bite_a_publish_checked_against_a_stale_base() {
    let bounds = bound(1, 0, 0, 2, true);
    bites(
        "stale base",
        bounds,
        "no tenant with data is routed to a shard that lacks it",
        |f| f.publish_checks_shards = false,
    );
}

#[test]
fn bite_a_verify_without_the_tenant_lock() {
    let bounds = bound(1, 0, 0, 0, false);
    bites(
        "verify unlocked",
        bounds,
        "verify passes only if the copies are equal",
        |f| f.verify_under_lock = false,
    );
}

#[test]
fn bite_a_key_range_verify_blind_to_a_one_sided_commit() {
    let bounds = bound(1, 0, 0, 0, false);
    bites(
        "verify without write chains",
        bounds,
        "verify passes only if the copies are equal",
        |f| f.verify_compares_write_chains = false,
    );
}

#[test]
fn bite_a_complete_that_leaves_the_former_shard_open() {
    let bounds = bound(1, 0, 1, 0, false);
    bites(
        "former shard open",
        bounds,
        "after complete no router writes the former shard",
        |f| f.complete_fences_former = false,
    );
}

#[test]
fn bite_row_images_before_deferred_constraints() {
    let bounds = bound(1, 0, 0, 0, false);
    bites(
        "images before constraints",
        bounds,
        "a write the source refused exists nowhere",
        |f| f.constraints_before_images = false,
    );
}

#[test]
fn bite_an_abort_that_pins_the_source_before_routers_left_reversed() {
    let bounds = bound(1, 0, 1, 2, false);
    bites(
        "abort skips the dual-write wait",
        bounds,
        "no tenant with data is routed to a shard that lacks it",
        |f| f.abort_waits_for_dual_write = false,
    );
}

#[test]
fn bite_a_publish_after_a_restore_rolled_the_intent_back() {
    let bounds = bound(1, 0, 0, 2, true);
    // Either fix alone prevents this loss.
    bites(
        "publish ignores the intent",
        bounds,
        "every acknowledged write is readable once quiet",
        |f| {
            f.publish_matches_intent = false;
            f.mover_checks_map_entry = false;
        },
    );
}

#[test]
fn bite_a_mover_that_publishes_over_a_map_without_its_move() {
    let bounds = bound(1, 0, 0, 2, true);
    // Found with the publish check as it was: a recovery publish over a
    // restored base drops the move, and the mover publishes `reversed` over it.
    // The shards' fences now refuse that publish too (defence in depth).
    bites(
        "mover ignores the map entry",
        bounds,
        "every acknowledged write is readable once quiet",
        |f| {
            f.mover_checks_map_entry = false;
            f.publish_checks_shards = false;
        },
    );
}

#[test]
fn bite_a_start_from_a_restored_map_that_clears_the_home() {
    let bounds = bound(0, 0, 0, 2, true);
    bites(
        "start clears unfenced rows",
        bounds,
        "no tenant with data is routed to a shard that lacks it",
        |f| f.start_keeps_unfenced_rows = false,
    );
}

#[test]
fn bite_a_backfill_from_a_restored_move_record() {
    bites(
        "backfill ignores the fences",
        bound(1, 0, 0, 2, true),
        "no tenant with data is routed to a shard that lacks it",
        |f| f.data_steps_check_fences = false,
    );
}
