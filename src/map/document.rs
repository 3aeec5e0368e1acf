//! Editing a map's TOML: the one place that pins, unpins, sets or clears a
//! move and bumps the version. Comments are not kept (the control database
//! stores maps as rendered here).

/// A shard map's TOML, open for editing.
///
/// ```
/// use shard_router::map::MapDocument;
///
/// let mut doc = MapDocument::parse("version = 3\n[shards.a]\nurl = \"postgres://h/a\"\n").unwrap();
/// doc.pin("acme", "a").unwrap();
/// doc.set_version(4);
/// let text = doc.render();
/// assert!(text.contains("version = 4") && text.contains("acme = \"a\""));
/// ```
#[derive(Debug, Clone)]
pub struct MapDocument {
    doc: toml::Table,
}

impl MapDocument {
    /// Parses `toml`. The error is the parser's message without the source
    /// line, which may hold a secret.
    ///
    /// ```
    /// assert!(shard_router::map::MapDocument::parse("version = ").is_err());
    /// ```
    pub fn parse(toml: &str) -> Result<Self, String> {
        toml.parse::<toml::Table>()
            .map(|doc| MapDocument { doc })
            .map_err(|e| e.message().to_owned())
    }

    /// Sets `version`.
    ///
    /// ```
    /// # let mut doc = shard_router::map::MapDocument::parse("version = 1").unwrap();
    /// doc.set_version(2);
    /// assert!(doc.render().contains("version = 2"));
    /// ```
    pub fn set_version(&mut self, version: u64) {
        self.doc
            .insert("version".into(), toml::Value::Integer(version as i64));
    }

    /// The table under `key`, created if missing; an error if `key` is not a table.
    fn table(&mut self, key: &str) -> Result<&mut toml::Table, String> {
        match self
            .doc
            .entry(key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(table) => Ok(table),
            _ => Err(format!("`{key}` is not a table")),
        }
    }

    /// Pins `tenant` to `shard`.
    ///
    /// ```
    /// # let mut doc = shard_router::map::MapDocument::parse("version = 1").unwrap();
    /// doc.pin("acme", "b").unwrap();
    /// assert!(doc.render().contains("acme = \"b\""));
    /// ```
    pub fn pin(&mut self, tenant: &str, shard: &str) -> Result<(), String> {
        self.table("tenants")?
            .insert(tenant.to_owned(), toml::Value::String(shard.to_owned()));
        Ok(())
    }

    /// Removes `tenant`'s pin, if any.
    ///
    /// ```
    /// # let mut doc = shard_router::map::MapDocument::parse("version = 1\n[tenants]\nacme = \"b\"").unwrap();
    /// doc.unpin("acme");
    /// assert!(!doc.render().contains("acme"));
    /// ```
    pub fn unpin(&mut self, tenant: &str) {
        if let Some(toml::Value::Table(pins)) = self.doc.get_mut("tenants") {
            pins.remove(tenant);
        }
    }

    /// Puts `tenant` in `[moves]` (and out of `[tenants]`) with `phase`.
    ///
    /// ```
    /// # let mut doc = shard_router::map::MapDocument::parse("version = 1").unwrap();
    /// doc.set_move("acme", "a", "b", "dual_write").unwrap();
    /// assert!(doc.render().contains("phase = \"dual_write\""));
    /// ```
    pub fn set_move(
        &mut self,
        tenant: &str,
        from: &str,
        to: &str,
        phase: &str,
    ) -> Result<(), String> {
        self.unpin(tenant);
        let mut entry = toml::Table::new();
        entry.insert("from".into(), toml::Value::String(from.to_owned()));
        entry.insert("to".into(), toml::Value::String(to.to_owned()));
        entry.insert("phase".into(), toml::Value::String(phase.to_owned()));
        self.table("moves")?
            .insert(tenant.to_owned(), toml::Value::Table(entry));
        Ok(())
    }

    /// Takes `tenant` out of `[moves]`.
    ///
    /// ```
    /// # let mut doc = shard_router::map::MapDocument::parse("version = 1").unwrap();
    /// doc.set_move("acme", "a", "b", "dual_write").unwrap();
    /// doc.clear_move("acme");
    /// assert!(!doc.render().contains("acme"));
    /// ```
    pub fn clear_move(&mut self, tenant: &str) {
        if let Some(toml::Value::Table(moves)) = self.doc.get_mut("moves") {
            moves.remove(tenant);
        }
    }

    /// The tenants whose `[moves]` entries differ between this map and `other`
    /// (added, removed or changed), sorted.
    ///
    /// ```
    /// # use shard_router::map::MapDocument;
    /// let mut a = MapDocument::parse("version = 1").unwrap();
    /// let b = a.clone();
    /// a.set_move("acme", "a", "b", "dual_write").unwrap();
    /// assert_eq!(a.moves_differing(&b), ["acme"]);
    /// ```
    pub fn moves_differing(&self, other: &MapDocument) -> Vec<String> {
        let empty = toml::Table::new();
        let moves = |d: &MapDocument| match d.doc.get("moves") {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => empty.clone(),
        };
        let (mine, theirs) = (moves(self), moves(other));
        let mut differing: Vec<String> = mine
            .keys()
            .chain(theirs.keys())
            .filter(|t| mine.get(*t) != theirs.get(*t))
            .cloned()
            .collect();
        differing.sort();
        differing.dedup();
        differing
    }

    /// The TOML text.
    ///
    /// ```
    /// # let doc = shard_router::map::MapDocument::parse("version = 1").unwrap();
    /// assert_eq!(doc.render().trim(), "version = 1");
    /// ```
    pub fn render(&self) -> String {
        toml::to_string(&self.doc).expect("a parsed TOML table renders")
    }
}
