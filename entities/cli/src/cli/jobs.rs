//! `shoal jobs list|show|retry|cancel`: the job routes of a gateway, from the shell. Each
//! prints the gateway's JSON answer on stdout; an error answer is printed on stderr and
//! the command fails.

use clap::Subcommand;
use reqwest::Method;

#[derive(Debug, Subcommand)]
pub(crate) enum JobsCommand {
    /// One page of jobs, newest first (JSON).
    List {
        #[command(flatten)]
        gateway: GatewayUrl,
        /// Only jobs in this status.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs of this type.
        #[arg(long = "type")]
        job_type: Option<String>,
        /// Page size (1–500).
        #[arg(long)]
        limit: Option<u32>,
        /// The previous page's `next_cursor`.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// A job's record, or its live view while it runs (JSON).
    Show {
        #[command(flatten)]
        gateway: GatewayUrl,
        /// The job's id.
        id: String,
    },
    /// Runs a dead or cancelled job again with a fresh attempt budget.
    Retry {
        #[command(flatten)]
        gateway: GatewayUrl,
        /// The job's id.
        id: String,
    },
    /// Cancels a job (a running attempt cooperatively).
    Cancel {
        #[command(flatten)]
        gateway: GatewayUrl,
        /// The job's id.
        id: String,
    },
}

/// `--gateway`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct GatewayUrl {
    /// The gateway's base URL.
    #[arg(
        long,
        env = "SHOAL_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    gateway: String,
}

impl JobsCommand {
    pub(crate) async fn run(&self) -> anyhow::Result<()> {
        let (gateway, method, path, query) = match self {
            Self::List {
                gateway,
                state,
                job_type,
                limit,
                cursor,
            } => {
                let query: Vec<(&str, String)> = [
                    ("state", state.clone()),
                    ("type", job_type.clone()),
                    ("limit", limit.map(|l| l.to_string())),
                    ("cursor", cursor.clone()),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect();
                (gateway, Method::GET, "/jobs".to_owned(), query)
            }
            Self::Show { gateway, id } => (gateway, Method::GET, job_path(id, ""), Vec::new()),
            Self::Retry { gateway, id } => {
                (gateway, Method::POST, job_path(id, "/retry"), Vec::new())
            }
            Self::Cancel { gateway, id } => {
                (gateway, Method::POST, job_path(id, "/cancel"), Vec::new())
            }
        };
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        let url = format!("{}{path}{query}", gateway.gateway.trim_end_matches('/'));
        let mut request = reqwest::Client::new().request(method.clone(), url);
        if method == Method::POST {
            request = request.json(&serde_json::json!({}));
        }
        let response = request.send().await?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            eprintln!("{body}");
            anyhow::bail!("the gateway answered {status}");
        }
        println!("{body}");
        Ok(())
    }
}

/// `/jobs/{id}{suffix}`, the id percent-encoded.
fn job_path(id: &str, suffix: &str) -> String {
    format!("/jobs/{}{suffix}", encode(id))
}

/// `text` percent-encoded (everything but letters, digits, `-`, `.` and `_`).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
