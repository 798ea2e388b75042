//! User and group names, read from the image's own `/etc/passwd` and `/etc/group`.
//!
//! The static binary carries no NSS modules, and a container's users live in those two files anyway: so
//! quiesce reads them itself (the format of passwd(5) and group(5)) instead of calling `getpwnam`, whose
//! static glibc build warns at link time and could only ever reach the files backend. Numeric ids need no
//! file at all; a name that is not there is an error naming the file.

use std::path::Path;

pub const PASSWD: &str = "/etc/passwd";
pub const GROUP: &str = "/etc/group";

/// A user's uid and primary gid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// The account named `name` in the passwd file at `path`. `Err` says why it cannot be read.
pub fn user_by_name(path: &Path, name: &str) -> Result<Option<Account>, String> {
    find(path, |f| {
        (f.first() == Some(&name)).then(|| account(f)).flatten()
    })
}

/// The account whose uid is `uid`, if the passwd file lists it (for its primary group). A missing file
/// lists nobody.
pub fn user_by_id(path: &Path, uid: u32) -> Option<Account> {
    find(path, |f| account(f).filter(|a| a.uid == uid))
        .ok()
        .flatten()
}

/// The gid of the group named `name` in the group file at `path`.
pub fn group_by_name(path: &Path, name: &str) -> Result<Option<u32>, String> {
    find(path, |f| {
        (f.first() == Some(&name))
            .then(|| f.get(2)?.parse().ok())
            .flatten()
    })
}

fn account(fields: &[&str]) -> Option<Account> {
    Some(Account {
        uid: fields.get(2)?.parse().ok()?,
        gid: fields.get(3)?.parse().ok()?,
    })
}

/// The first line of the colon-separated file at `path` that `pick` accepts; comments, blank and malformed
/// lines are skipped, as the C library does.
fn find<T>(path: &Path, pick: impl Fn(&[&str]) -> Option<T>) -> Result<Option<T>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| pick(&l.split(':').collect::<Vec<_>>())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn names_and_ids_resolve_from_the_files() {
        let passwd = file(
            "# comment\nroot:x:0:0:root:/root:/bin/sh\nbroken line\nnobody:x:65534:65533::/:/sbin/nologin\n",
        );
        let group = file("root:x:0:\nnogroup:x:65533:\n");
        let nobody = Account {
            uid: 65534,
            gid: 65533,
        };
        assert_eq!(user_by_name(passwd.path(), "nobody"), Ok(Some(nobody)));
        assert_eq!(user_by_name(passwd.path(), "ghost"), Ok(None));
        assert_eq!(user_by_id(passwd.path(), 65534), Some(nobody));
        assert_eq!(user_by_id(passwd.path(), 4242), None);
        assert_eq!(group_by_name(group.path(), "nogroup"), Ok(Some(65533)));
        assert_eq!(group_by_name(group.path(), "x"), Ok(None));
    }

    #[test]
    fn a_missing_file_is_named_in_the_error_and_lists_no_one() {
        let missing = Path::new("/nonexistent/etc/passwd");
        let err = user_by_name(missing, "nobody").expect_err("no file");
        assert!(
            err.starts_with("cannot read /nonexistent/etc/passwd: "),
            "{err}"
        );
        assert_eq!(user_by_id(missing, 0), None);
    }
}
