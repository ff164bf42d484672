//! `pymesh._engine`: the engine as a Python extension. Bindings only: every
//! decision is the engine's. The engine runs on its own Tokio threads; Python
//! calls release the GIL while they wait, and nothing on the request path ever
//! takes it.

use std::time::Duration;

use pymesh_engine::{config, ConfigError, Error, Proxy};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The engine's Tokio runtime, driven by a thread of its own so that Python threads
/// only ever wait on it (with the GIL released) and never run it.
struct Threads {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    driver: Option<std::thread::JoinHandle<()>>,
}

impl Threads {
    /// One thread (the default) is a current-thread runtime, as in the sidecar.
    fn start(threads: usize) -> std::io::Result<Self> {
        let mut builder = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads).thread_name("pymesh-worker");
            builder
        };
        let runtime = builder.enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = std::thread::Builder::new()
            .name("pymesh-engine".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            driver: Some(driver),
        })
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.handle.block_on(future)
    }

    fn running(&self) -> bool {
        self.driver.is_some()
    }

    /// Ends the runtime; tasks still running are dropped.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(driver) = self.driver.take() {
            let _ = driver.join();
        }
    }
}

/// A running engine. Created started; `stop()` drains it.
#[pyclass(module = "pymesh._engine", name = "Engine")]
struct Engine {
    threads: Threads,
    proxy: Proxy,
}

#[pymethods]
impl Engine {
    /// Starts an engine from config text (JSON or YAML, the protobuf JSON mapping
    /// of `ProxyConfig`). `origin` names where the text came from, for errors.
    #[new]
    #[pyo3(signature = (config_text, threads = 1, origin = None))]
    fn new(
        py: Python<'_>,
        config_text: &str,
        threads: usize,
        origin: Option<&str>,
    ) -> PyResult<Self> {
        let config = parse(py, config_text, origin)?;
        let mut engine_threads = Threads::start(threads).map_err(|e| {
            PyRuntimeError::new_err(format!("cannot start the engine's threads: {e}"))
        })?;
        match py.detach(|| engine_threads.block_on(Proxy::start(config))) {
            Ok(proxy) => Ok(Self {
                threads: engine_threads,
                proxy,
            }),
            Err(e) => {
                py.detach(|| engine_threads.stop());
                Err(engine_error(py, e, origin))
            }
        }
    }

    /// Replaces the running config; on error the running one stays.
    #[pyo3(signature = (config_text, origin = None))]
    fn reload(&self, py: Python<'_>, config_text: &str, origin: Option<&str>) -> PyResult<()> {
        self.check_running()?;
        let proxy = &self.proxy;
        py.detach(|| self.threads.block_on(proxy.reload_text(config_text)))
            .map_err(|e| engine_error(py, e, origin))
    }

    /// Stops accepting, drains in-flight requests for up to `grace` seconds, and
    /// stops the engine's threads. Returns whether everything drained in time.
    #[pyo3(signature = (grace = 5.0))]
    fn stop(&mut self, py: Python<'_>, grace: f64) -> PyResult<bool> {
        if !self.threads.running() {
            return Ok(true);
        }
        let grace = Duration::try_from_secs_f64(grace.max(0.0)).unwrap_or(Duration::from_secs(5));
        let proxy = self.proxy.clone();
        let threads = &mut self.threads;
        Ok(py.detach(move || {
            let drained = threads.block_on(proxy.shutdown(grace));
            threads.stop();
            drained
        }))
    }

    #[getter]
    fn running(&self) -> bool {
        self.threads.running()
    }

    /// The admin endpoint's address, `IP:port`.
    #[getter]
    fn admin_address(&self) -> String {
        self.proxy.admin_addr().to_string()
    }

    /// `(name, "IP:port")` for every listener, with the ports actually bound.
    #[getter]
    fn listeners(&self) -> Vec<(String, String)> {
        self.proxy
            .listeners()
            .into_iter()
            .map(|(name, addr)| (name, addr.to_string()))
            .collect()
    }

    /// The metrics in the Prometheus (OpenMetrics) text format.
    fn metrics(&self) -> String {
        self.proxy.metrics_text()
    }

    /// The running config as JSON.
    fn config(&self) -> String {
        self.proxy.config_json()
    }
}

impl Engine {
    fn check_running(&self) -> PyResult<()> {
        if self.threads.running() {
            Ok(())
        } else {
            Err(PyRuntimeError::new_err("the proxy is stopped"))
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.threads.stop();
    }
}

/// Validates config text without starting anything; raises `pymesh.ConfigError`.
#[pyfunction]
#[pyo3(signature = (config_text, origin = None))]
fn validate(py: Python<'_>, config_text: &str, origin: Option<&str>) -> PyResult<String> {
    let parsed = parse(py, config_text, origin)?;
    config::validate(&parsed).map_err(|e| config_error(py, &e, origin))?;
    Ok(config::to_json(&parsed))
}

fn parse(py: Python<'_>, text: &str, origin: Option<&str>) -> PyResult<config::ProxyConfig> {
    config::parse(text).map_err(|e| config_error(py, &e, origin))
}

/// Raises `pymesh.errors.ConfigError(path, message)`, defined on the Python side so
/// the exception hierarchy lives in one place.
fn config_error(py: Python<'_>, e: &ConfigError, origin: Option<&str>) -> PyErr {
    let message = match origin {
        Some(origin) => format!("{} (in {origin})", e.message),
        None => e.message.clone(),
    };
    python_error(py, "ConfigError", (e.path.clone(), message))
}

fn engine_error(py: Python<'_>, e: Error, origin: Option<&str>) -> PyErr {
    match e {
        Error::Config(e) => config_error(py, &e, origin),
        other => python_error(py, "MeshError", (other.to_string(),)),
    }
}

fn python_error<A>(py: Python<'_>, class: &str, args: A) -> PyErr
where
    A: for<'py> pyo3::call::PyCallArgs<'py>,
{
    let made = py
        .import("pymesh.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1(args));
    match made {
        Ok(instance) => PyErr::from_value(instance),
        Err(e) => e,
    }
}

/// Sends the engine's logs to stderr, filtered like `info` or `pymesh_engine=debug`.
/// The first call wins; later calls report whether logging was already on.
#[pyfunction]
#[pyo3(signature = (filter = "info", json = false))]
fn init_logging(filter: &str, json: bool) -> PyResult<bool> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
        pyo3::exceptions::PyValueError::new_err(format!("log filter {filter:?}: {e}"))
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let installed = if json {
        builder.json().try_init().is_ok()
    } else {
        builder.try_init().is_ok()
    };
    Ok(installed)
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
