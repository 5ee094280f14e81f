//! The owner thread: the one thread that holds a model's sessions and calls `Session::run`.
//!
//! Async code never blocks on inference. It hands the thread a [`StepTask`] (one request's generation)
//! through a channel; the thread keeps every accepted task and advances them round-robin, one step
//! (prefill, or one decode token) each, so concurrent streams progress together instead of queueing
//! behind each other. A task that panics is dropped with an error report; the thread goes on.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// What a task says after one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Continue,
    Done,
}

/// One unit of work that runs on the owner thread in steps.
pub trait StepTask<M>: Send {
    /// Runs one step. Returning `Done` drops the task.
    fn step(&mut self, model: &mut M) -> TaskState;
    /// Called instead of further steps when a step panicked or the thread is shutting down.
    fn abort(&mut self, message: &str);
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

impl<M: Send + 'static> EngineThread<M> {
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

fn run_loop<M>(mut model: M, rx: mpsc::Receiver<Command<M>>) {
    let mut active: Vec<Box<dyn StepTask<M>>> = Vec::new();
    let mut shutting_down = false;
    loop {
        // Block only when idle; otherwise pick up new tasks between rounds.
        if active.is_empty() {
            if shutting_down {
                return;
            }
            match rx.recv() {
                Ok(Command::Start(t)) => active.push(t),
                Ok(Command::Shutdown) | Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Command::Start(t)) => active.push(t),
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
        let mut i = 0;
        while i < active.len() {
            let task = &mut active[i];
            let state = std::panic::catch_unwind(AssertUnwindSafe(|| task.step(&mut model)));
            let done = match state {
                Ok(TaskState::Continue) => false,
                Ok(TaskState::Done) => true,
                Err(panic) => {
                    let msg = panic_message(&panic);
                    tracing::error!(error = %msg, "a generation step panicked");
                    task.abort(&format!("internal error: {msg}"));
                    true
                }
            };
            if done {
                active.swap_remove(i);
            } else {
                i += 1;
            }
        }
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

    impl StepTask<()> for Counter {
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
        fn abort(&mut self, msg: &str) {
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
