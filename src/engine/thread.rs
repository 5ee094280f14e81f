//! The owner thread: the one thread that holds a model's sessions and calls `Session::run`.
//!
//! Async code never blocks on inference. It hands the thread a [`StepTask`] (one request's generation)
//! through a channel; the thread keeps every accepted task and advances them in rounds, so concurrent
//! streams progress together instead of queueing behind each other. One round (the schedule):
//!
//! 1. one prompt step ([`StepKind::Prefill`]: media encoding or one prefill chunk) of the task whose
//!    prompt waited longest — prompts take turns, and a decoding stream waits for at most one chunk;
//! 2. one step of every task that decodes alone ([`StepKind::Decode`]: models that cannot batch);
//! 3. one shared decoder run ([`SharedStep::shared_step`]) for every row of the model's decode batch,
//!    then one step of every task with rows in it ([`StepKind::Shared`]) to take its logits, sample and
//!    feed its next ids. Rows join and leave between runs.
//!
//! Prefill chunks run beside the batched decode run, not in it: the graphs take rectangular
//! `[rows, positions]` inputs, so a decode row sharing a run with a 512-position chunk would be
//! padded to 512 positions. A task that panics is dropped with an error report; the thread goes on.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// What a task says after one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Continue,
    Done,
}

/// What a task's next step is, for the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Prompt work (encoders, a prefill chunk): one such step per round, over all tasks.
    Prefill,
    /// A decode step the task runs by itself.
    Decode,
    /// The task's rows are in the model's shared run; its step takes their results.
    Shared,
}

/// One unit of work that runs on the owner thread in steps.
pub trait StepTask<M>: Send {
    /// What the next step is.
    fn kind(&self) -> StepKind;
    /// Runs one step. Returning `Done` drops the task.
    fn step(&mut self, model: &mut M) -> TaskState;
    /// Called instead of further steps when a step panicked.
    fn abort(&mut self, model: &mut M, message: &str);
}

/// The model side of the schedule: the one run shared by every [`StepKind::Shared`] task.
pub trait SharedStep {
    fn shared_step(&mut self);
    /// After `shared_step` panicked: give every row an error and drop them.
    fn reset_shared(&mut self);
}

enum Command<M> {
    Start(Box<dyn StepTask<M>>),
    Shutdown,
}

/// Handle to an owner thread running model `M`.
pub struct EngineThread<M: 'static> {
    tx: mpsc::Sender<Command<M>>,
    join: Option<JoinHandle<()>>,
}

impl<M: SharedStep + Send + 'static> EngineThread<M> {
    /// Spawns the thread; `make` builds the model on it (so sessions are created where they run).
    pub fn spawn<E: Send + 'static>(
        name: &str,
        make: impl FnOnce() -> Result<M, E> + Send + 'static,
    ) -> Result<(Self, std::sync::mpsc::Receiver<Result<(), E>>), std::io::Error> {
        let (tx, rx) = mpsc::channel::<Command<M>>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let model = match make() {
                    Ok(m) => {
                        let _ = ready_tx.send(Ok(()));
                        m
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run_loop(model, rx);
            })?;
        Ok((
            Self {
                tx,
                join: Some(join),
            },
            ready_rx,
        ))
    }

    /// Queues a task; gives it back if the thread has stopped.
    pub fn submit(&self, task: Box<dyn StepTask<M>>) -> Result<(), Box<dyn StepTask<M>>> {
        self.tx.send(Command::Start(task)).map_err(|e| match e.0 {
            Command::Start(t) => t,
            Command::Shutdown => unreachable!(),
        })
    }
}

impl<M: 'static> Drop for EngineThread<M> {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct Active<M> {
    task: Box<dyn StepTask<M>>,
    /// Round of the task's last prompt step (prompts take turns by it).
    last_prefill: u64,
}

/// One step of `task`; `true` = the task is done (finished, or panicked and aborted).
fn run_step<M>(model: &mut M, task: &mut dyn StepTask<M>) -> bool {
    let state = std::panic::catch_unwind(AssertUnwindSafe(|| task.step(model)));
    match state {
        Ok(TaskState::Continue) => false,
        Ok(TaskState::Done) => true,
        Err(panic) => {
            let msg = panic_message(&panic);
            tracing::error!(error = %msg, "a generation step panicked");
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
                task.abort(model, &format!("internal error: {msg}"))
            }));
            true
        }
    }
}

fn run_loop<M: SharedStep>(mut model: M, rx: mpsc::Receiver<Command<M>>) {
    let mut active: Vec<Active<M>> = Vec::new();
    let mut shutting_down = false;
    let mut round = 0u64;
    let new = |t| Active {
        task: t,
        last_prefill: 0,
    };
    loop {
        // Block only when idle; otherwise pick up new tasks between rounds.
        if active.is_empty() {
            if shutting_down {
                return;
            }
            match rx.recv() {
                Ok(Command::Start(t)) => active.push(new(t)),
                Ok(Command::Shutdown) | Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Command::Start(t)) => active.push(new(t)),
                Ok(Command::Shutdown) => shutting_down = true,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    shutting_down = true;
                    break;
                }
            }
        }
        if shutting_down && active.is_empty() {
            return;
        }
        round += 1;
        let mut done = vec![false; active.len()];
        // 1. The prompt that waited longest.
        if let Some(i) = (0..active.len())
            .filter(|&i| active[i].task.kind() == StepKind::Prefill)
            .min_by_key(|&i| active[i].last_prefill)
        {
            active[i].last_prefill = round;
            done[i] = run_step(&mut model, active[i].task.as_mut());
        }
        // 2. Sequences that decode alone.
        for (i, a) in active.iter_mut().enumerate() {
            if !done[i] && a.task.kind() == StepKind::Decode {
                done[i] = run_step(&mut model, a.task.as_mut());
            }
        }
        // 3. The shared run, then its tasks.
        let shared: Vec<usize> = (0..active.len())
            .filter(|&i| !done[i] && active[i].task.kind() == StepKind::Shared)
            .collect();
        if !shared.is_empty() {
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| model.shared_step())) {
                tracing::error!(error = %panic_message(&panic), "the batched decoder step panicked");
                model.reset_shared();
            }
            for i in shared {
                done[i] = run_step(&mut model, active[i].task.as_mut());
            }
        }
        let mut i = 0;
        active.retain(|_| {
            let keep = !done[i];
            i += 1;
            keep
        });
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Counter {
        id: usize,
        left: usize,
        log: Arc<Mutex<Vec<usize>>>,
    }

    impl SharedStep for () {
        fn shared_step(&mut self) {}
        fn reset_shared(&mut self) {}
    }

    impl StepTask<()> for Counter {
        fn kind(&self) -> StepKind {
            StepKind::Decode
        }
        fn step(&mut self, _: &mut ()) -> TaskState {
            self.log.lock().unwrap().push(self.id);
            if self.id == 99 {
                panic!("boom");
            }
            self.left -= 1;
            if self.left == 0 {
                TaskState::Done
            } else {
                TaskState::Continue
            }
        }
        fn abort(&mut self, _: &mut (), msg: &str) {
            assert!(msg.contains("boom"));
            self.log.lock().unwrap().push(1000);
        }
    }

    #[test]
    fn tasks_interleave_and_panics_are_contained() {
        let (t, ready) = EngineThread::spawn("test", || Ok::<(), ()>(())).unwrap();
        ready.recv().unwrap().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        // Hold the thread busy with a first task so that the next two start in the same round.
        t.submit(Box::new(Counter {
            id: 99,
            left: 1,
            log: log.clone(),
        }))
        .ok()
        .unwrap();
        t.submit(Box::new(Counter {
            id: 1,
            left: 3,
            log: log.clone(),
        }))
        .ok()
        .unwrap();
        t.submit(Box::new(Counter {
            id: 2,
            left: 3,
            log: log.clone(),
        }))
        .ok()
        .unwrap();
        drop(t); // shutdown waits for active tasks
        let log = log.lock().unwrap().clone();
        assert!(log.contains(&1000), "panic reported through abort: {log:?}");
        assert_eq!(log.iter().filter(|&&x| x == 1).count(), 3);
        assert_eq!(log.iter().filter(|&&x| x == 2).count(), 3);
    }
}
