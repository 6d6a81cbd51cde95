//! Which agent announces (ARP / NDP) each Gateway address: rendezvous hashing over the agents
//! that can, with a handover that never makes two announcers. Pure: the agents' facts and the
//! time come in, each agent's announce list and each address's [`Announcement`] go out.
//!
//! The rules, for each address:
//! - The winner is the eligible agent (in contact, not refusing, lists the "announce" feature)
//!   with the highest hash of (address, node): adding an agent moves only the addresses it now
//!   wins, and addresses spread over the nodes.
//! - A holder is an agent that may be announcing the address: its last answer listed it, or an
//!   Apply that listed it was sent and not answered. A holder stays one until it answers with a
//!   state without the address, or until `failover` has passed since the last RPC sent to it
//!   (any RPC renews its lease, and the lease is shorter than `failover`, so by then it stopped).
//! - The address is given to the winner only once no other agent holds it.
//! - An agent whose first Get is under way (for at most `failover`) counts as a winner for
//!   addresses nobody holds: at startup they wait for it rather than go to whichever agent
//!   answered first and move again moments later, unannounced in between.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::model::Announcement;

/// What the planner knows of one agent.
#[derive(Clone, Debug, Default)]
pub struct AgentFacts {
    /// The node it runs on (the rendezvous key).
    pub node: String,
    /// Its last RPC succeeded.
    pub in_contact: bool,
    /// In contact, not refusing the state, and lists the "announce" feature.
    pub eligible: bool,
    /// Why it is not eligible (for the status message).
    pub why_not: Option<String>,
    /// What it announces by its last answer.
    pub acked: BTreeSet<IpAddr>,
    /// What it may announce: `acked` and every Apply sent since.
    pub maybe: BTreeSet<IpAddr>,
    /// When the last RPC was sent to it.
    pub last_request: Option<Instant>,
    /// Since when its first Get is under way (`None` once it answered or failed).
    pub first_contact_since: Option<Instant>,
}

impl AgentFacts {
    /// It may be announcing `address` at `now`.
    fn holds(&self, address: &IpAddr, now: Instant, failover: Duration) -> bool {
        self.maybe.contains(address)
            && (self.in_contact
                || self
                    .last_request
                    .is_some_and(|sent| now.saturating_duration_since(sent) <= failover))
    }

    /// Its first answer is awaited at `now`: until when.
    fn awaited_until(&self, now: Instant, failover: Duration) -> Option<Instant> {
        self.first_contact_since
            .map(|since| since + failover)
            .filter(|until| now < *until)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Each agent's announce list, by the agents' keys (every agent listed, maybe empty).
    pub lists: BTreeMap<String, BTreeSet<IpAddr>>,
    pub facts: BTreeMap<IpAddr, Announcement>,
    /// When a lost holder's bound passes: plan again then.
    pub next_deadline: Option<Instant>,
}

/// The rendezvous weight of `node` for `address`: FNV-1a over both, then a splitmix64 finish
/// to spread the bits. Fixed, so every controller replica and restart chooses alike.
fn weight(address: &IpAddr, node: &str) -> u64 {
    let octets = match address {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in octets.iter().chain([0xff].iter()).chain(node.as_bytes()) {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Plans every address over `agents` (by key) at `now`.
pub fn plan(
    addresses: &BTreeSet<IpAddr>,
    agents: &BTreeMap<String, AgentFacts>,
    now: Instant,
    failover: Duration,
) -> Plan {
    let mut plan = Plan {
        lists: agents
            .keys()
            .map(|k| (k.clone(), BTreeSet::new()))
            .collect(),
        ..Plan::default()
    };
    for address in addresses {
        let holders: Vec<(&String, &AgentFacts)> = agents
            .iter()
            .filter(|(_, a)| a.holds(address, now, failover))
            .collect();
        let winner = agents
            .iter()
            .filter(|(_, a)| {
                a.eligible || (holders.is_empty() && a.awaited_until(now, failover).is_some())
            })
            .max_by_key(|(key, a)| (weight(address, &a.node), *key));
        if let Some(until) = winner.and_then(|(_, a)| a.awaited_until(now, failover)) {
            plan.next_deadline = Some(plan.next_deadline.map_or(until, |d| d.min(until)));
        }
        let others: Vec<&(&String, &AgentFacts)> = holders
            .iter()
            .filter(|(key, _)| winner.is_none_or(|(w, _)| w != *key))
            .collect();
        let fact = if let Some((key, facts)) = winner.filter(|_| others.is_empty()) {
            plan.lists
                .get_mut(key)
                .expect("every agent has a list")
                .insert(*address);
            if facts.in_contact && facts.acked.contains(address) {
                Announcement::Announced {
                    node: facts.node.clone(),
                }
            } else {
                Announcement::Assigned {
                    node: facts.node.clone(),
                }
            }
        } else if let Some((_, announcing)) = others
            .iter()
            .find(|(_, a)| a.in_contact && a.acked.contains(address))
        {
            // Handing over (or no one else can take it): the holder still announces it.
            Announcement::Announced {
                node: announcing.node.clone(),
            }
        } else if let Some((_, lost)) = others.iter().find(|(_, a)| !a.in_contact) {
            if let Some(sent) = lost.last_request {
                let deadline = sent + failover;
                plan.next_deadline = Some(plan.next_deadline.map_or(deadline, |d| d.min(deadline)));
            }
            Announcement::FailingOver {
                node: lost.node.clone(),
            }
        } else if let Some((_, leaving)) = others.first() {
            // Sent a state without it, not answered yet.
            Announcement::Assigned {
                node: leaving.node.clone(),
            }
        } else {
            Announcement::NoAnnouncer(no_announcer(agents))
        };
        plan.facts.insert(*address, fact);
    }
    plan
}

fn no_announcer(agents: &BTreeMap<String, AgentFacts>) -> String {
    if agents.is_empty() {
        return "no agents".into();
    }
    let why: Vec<String> = agents
        .values()
        .map(|a| {
            format!(
                "{}: {}",
                a.node,
                a.why_not.as_deref().unwrap_or("not eligible")
            )
        })
        .collect();
    format!("no in-sync agent can announce it ({})", why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(node: &str) -> AgentFacts {
        AgentFacts {
            node: node.into(),
            in_contact: true,
            eligible: true,
            ..AgentFacts::default()
        }
    }

    fn addresses(n: u8) -> BTreeSet<IpAddr> {
        (1..=n).map(|i| IpAddr::from([198, 51, 100, i])).collect()
    }

    fn owners(plan: &Plan) -> BTreeMap<IpAddr, String> {
        plan.lists
            .iter()
            .flat_map(|(k, l)| l.iter().map(move |a| (*a, k.clone())))
            .collect()
    }

    #[test]
    fn spread_and_stable_when_an_agent_joins() {
        let now = Instant::now();
        let failover = Duration::from_secs(2);
        let all = addresses(60);
        let three: BTreeMap<String, AgentFacts> =
            ["n1", "n2", "n3"].map(|n| (n.to_owned(), agent(n))).into();
        let before = owners(&plan(&all, &three, now, failover));
        assert_eq!(before.len(), 60, "every address has one owner");
        for node in ["n1", "n2", "n3"] {
            let count = before.values().filter(|o| *o == node).count();
            assert!((8..=32).contains(&count), "{node} owns {count} of 60");
        }
        let mut four = three.clone();
        four.insert("n4".into(), agent("n4"));
        let after = owners(&plan(&all, &four, now, failover));
        let moved: Vec<_> = all.iter().filter(|a| before[a] != after[a]).collect();
        assert!(
            moved.iter().all(|a| after[a] == "n4"),
            "only moves to the new agent"
        );
        assert!(
            (5..=30).contains(&moved.len()),
            "{} of 60 moved",
            moved.len()
        );
    }

    #[test]
    fn a_lost_announcer_keeps_the_address_until_the_bound() {
        let start = Instant::now();
        let failover = Duration::from_secs(2);
        let address = IpAddr::from([198, 51, 100, 7]);
        let all = BTreeSet::from([address]);
        let mut agents: BTreeMap<String, AgentFacts> =
            ["n1", "n2"].map(|n| (n.to_owned(), agent(n))).into();
        let owner = owners(&plan(&all, &agents, start, failover))[&address].clone();
        let other = if owner == "n1" { "n2" } else { "n1" };
        let lost = agents.get_mut(&owner).unwrap();
        lost.acked.insert(address);
        lost.maybe.insert(address);
        assert_eq!(
            plan(&all, &agents, start, failover).facts[&address],
            Announcement::Announced {
                node: owner.clone()
            }
        );
        // The owner stops answering: nobody gets the address before the bound.
        let lost = agents.get_mut(&owner).unwrap();
        lost.in_contact = false;
        lost.eligible = false;
        lost.last_request = Some(start);
        let during = plan(&all, &agents, start + failover, failover);
        assert!(during.lists.values().all(BTreeSet::is_empty), "{during:?}");
        assert_eq!(
            during.facts[&address],
            Announcement::FailingOver {
                node: owner.clone()
            }
        );
        assert_eq!(during.next_deadline, Some(start + failover));
        let after = plan(
            &all,
            &agents,
            start + failover + Duration::from_millis(1),
            failover,
        );
        assert_eq!(owners(&after)[&address], other);
        // It comes back: it must first answer with a state without the address.
        let back = agents.get_mut(&owner).unwrap();
        back.in_contact = true;
        back.eligible = true;
        let other_facts = agents.get_mut(other).unwrap();
        other_facts.acked.insert(address);
        other_facts.maybe.insert(address);
        let back = plan(&all, &agents, start + 2 * failover, failover);
        assert!(
            back.lists.values().filter(|l| l.contains(&address)).count() <= 1,
            "{back:?}"
        );
        assert!(!back.lists[&owner].contains(&address) || !back.lists[other].contains(&address));
    }

    /// At startup, an address whose winner has not answered its first Get yet waits for it
    /// (for at most the bound) instead of going to the agent that answered first.
    #[test]
    fn startup_waits_for_the_winner_s_first_answer() {
        let start = Instant::now();
        let failover = Duration::from_secs(2);
        let all = addresses(20);
        let both: BTreeMap<String, AgentFacts> =
            ["n1", "n2"].map(|n| (n.to_owned(), agent(n))).into();
        let settled = owners(&plan(&all, &both, start, failover));
        let mut agents = both.clone();
        let connecting = agents.get_mut("n2").unwrap();
        connecting.in_contact = false;
        connecting.eligible = false;
        connecting.first_contact_since = Some(start);
        let early = plan(&all, &agents, start + failover / 2, failover);
        assert_eq!(owners(&early), settled, "nothing handed to n1 to move back");
        let waiting = all.iter().find(|a| settled[*a] == "n2").unwrap();
        assert_eq!(
            early.facts[waiting],
            Announcement::Assigned { node: "n2".into() }
        );
        assert_eq!(early.next_deadline, Some(start + failover));
        // n2 never answers: after the bound n1 takes everything.
        let late = plan(&all, &agents, start + failover, failover);
        assert!(owners(&late).values().all(|o| o == "n1"), "{late:?}");
        // An address someone holds is not held back for an agent still connecting.
        let held = agents.get_mut("n1").unwrap();
        held.acked.insert(*waiting);
        held.maybe.insert(*waiting);
        let kept = plan(&all, &agents, start, failover);
        assert_eq!(owners(&kept)[waiting], "n1");
    }

    #[test]
    fn no_eligible_agent_says_why() {
        let mut old = agent("n1");
        old.eligible = false;
        old.why_not = Some("does not list the \"announce\" feature".into());
        let agents = BTreeMap::from([("n1".to_owned(), old)]);
        let p = plan(
            &addresses(1),
            &agents,
            Instant::now(),
            Duration::from_secs(2),
        );
        assert_eq!(
            p.facts.values().next(),
            Some(&Announcement::NoAnnouncer(
                "no in-sync agent can announce it (n1: does not list the \"announce\" feature)"
                    .into()
            ))
        );
        assert!(p.lists["n1"].is_empty());
    }
}
