//! How a [`ShoalConfig`] is built from its layers ([`ConfigLoader`]) and the sections the
//! runtime leaves to the application ([`ApplicationConfig`]).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;

use super::{ConfigError, DEFAULT_CONFIG_FILE, ENV_PREFIX, ShoalConfig};

/// Builds a [`ShoalConfig`] from its layers.
#[derive(Debug, Default)]
pub struct ConfigLoader {
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
    overrides: Vec<(String, Value)>,
    application: Vec<String>,
}

/// The sections of the configuration that belong to the application (declared with
/// [`ConfigLoader::application_sections`]): the runtime does not read them, the
/// application decodes them with [`ApplicationConfig::section`].
#[derive(Debug, Clone, Default)]
pub struct ApplicationConfig(figment::value::Dict);

impl ApplicationConfig {
    /// Section `name` decoded as `T` (`T::default()` when absent).
    pub fn section<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, ConfigError> {
        match self.0.get(name) {
            Some(value) => value
                .deserialize()
                .map_err(|e| ConfigError::Load(format!("[{name}]: {e}"))),
            None => Ok(T::default()),
        }
    }
}

impl ConfigLoader {
    /// A loader with defaults only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `path` over the defaults (it must exist).
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.file = Some(path.as_ref().to_owned());
        self
    }

    /// Reads `path` if given, else [`DEFAULT_CONFIG_FILE`] when it exists.
    pub fn file_or_default(self, path: Option<&Path>) -> Self {
        match path {
            Some(path) => self.file(path),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => self.file(DEFAULT_CONFIG_FILE),
            None => self,
        }
    }

    /// Applies the `SHOAL__*` entries of `vars` (pass `std::env::vars()`).
    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        self
    }

    /// Sets `key` (dotted, kebab-case: `runner.listen`) from a command-line flag, if given.
    pub fn set(mut self, key: &str, value: Option<impl Into<Value>>) -> Self {
        if let Some(value) = value {
            self.overrides.push((key.to_owned(), value.into()));
        }
        self
    }

    /// Declares top-level sections (`[jobs]`, `SHOAL__JOBS__…`) as the application's: the
    /// runtime neither reads nor rejects them; [`Self::load_with_application`] returns them.
    pub fn application_sections(mut self, names: &[&str]) -> Self {
        self.application
            .extend(names.iter().map(|n| (*n).to_owned()));
        self
    }

    /// Merges the layers, then validates.
    pub fn load(self) -> Result<ShoalConfig, ConfigError> {
        self.load_with_application().map(|(config, _)| config)
    }

    /// Merges the layers, validates the runtime's part and returns the application's
    /// sections beside it.
    pub fn load_with_application(self) -> Result<(ShoalConfig, ApplicationConfig), ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(ShoalConfig::default()));
        if let Some(file) = &self.file {
            if !file.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        for (var, raw) in &self.env {
            let key = env_key(var);
            let value = raw
                .parse::<Value>()
                .unwrap_or_else(|_| Value::from(raw.clone()));
            figment = figment.merge(Serialized::default(&key, value));
        }
        for (key, value) in self.overrides {
            figment = figment.merge(Serialized::default(&key, value));
        }
        let mut dict: figment::value::Dict = figment.extract()?;
        let mut application = figment::value::Dict::new();
        for name in &self.application {
            if let Some(section) = dict.remove(name) {
                application.insert(name.clone(), section);
            }
        }
        let config: ShoalConfig =
            Figment::from(Serialized::defaults(Value::from(dict))).extract()?;
        config.validate()?;
        Ok((config, ApplicationConfig(application)))
    }
}

/// `SHOAL__RUNNER__POLL_INTERVAL` → `runner.poll-interval`.
fn env_key(var: &str) -> String {
    var[ENV_PREFIX.len()..]
        .to_ascii_lowercase()
        .split("__")
        .map(|part| part.replace('_', "-"))
        .collect::<Vec<_>>()
        .join(".")
}
